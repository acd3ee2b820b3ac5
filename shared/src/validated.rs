//! String newtypes whose every value has passed a check: identifiers the
//! agent and controller use as file names, database keys and URL parts.
//! Parse, don't validate: the only ways in are `parse` and serde (which
//! calls it), so a value of the type is proof of the check.
//!
//! One macro instead of the same dozen impls per type (`RolloutId`,
//! `Sha256Hex`, the agent's `RunId`).

/// Define `$name(String)` with `parse`, `as_str`, `Display`,
/// `TryFrom<String>`, `From<$name> for String` and serde through them,
/// and its error `$error(pub String)` with the message `$message` (`{0:?}`
/// is the rejected input).
///
/// ```
/// rollguard_shared::validated_string! {
///     /// A lowercase word.
///     pub struct Word;
///     error BadWord = "{0:?} is not a lowercase word";
///     check = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase());
/// }
/// assert_eq!(Word::parse("abc").unwrap().as_str(), "abc");
/// assert!(Word::parse("ABC").is_err());
/// ```
#[macro_export]
macro_rules! validated_string {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident;
        error $error:ident = $message:literal;
        check = $check:expr;
    ) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash,
            serde::Serialize, serde::Deserialize,
        )]
        #[serde(try_from = "String", into = "String")]
        $vis struct $name(String);

        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        #[error($message)]
        $vis struct $error(pub String);

        impl $name {
            /// Check `raw` and wrap it.
            pub fn parse(raw: &str) -> Result<Self, $error> {
                let check: fn(&str) -> bool = $check;
                if check(raw) {
                    Ok($name(raw.to_string()))
                } else {
                    Err($error(raw.to_string()))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Wrap a value built by this crate's own code, which passes
            /// the check by construction (checked in debug builds).
            #[allow(dead_code)]
            fn from_trusted(s: String) -> Self {
                debug_assert!(($check as fn(&str) -> bool)(&s), "{s:?}");
                $name(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = $error;
            fn try_from(s: String) -> Result<Self, Self::Error> {
                $name::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
