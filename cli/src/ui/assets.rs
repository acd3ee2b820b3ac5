//! The page, its script and its style, compiled into the binary. Plain
//! HTML, CSS and JavaScript with no framework and no build step: a few
//! tens of KiB, nothing fetched at run time.

pub const INDEX_HTML: &str = include_str!("assets/index.html");
pub const APP_JS: &str = include_str!("assets/app.js");
pub const APP_CSS: &str = include_str!("assets/app.css");

/// The element of the page that the sign-in answer replaces with the
/// session secret (`ui::server`), in that one answer only.
pub const SESSION_SLOT: &str = r#"<meta name="rollguard-session" content="">"#;

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_has_its_session_slot_once() {
        assert_eq!(super::INDEX_HTML.matches(super::SESSION_SLOT).count(), 1);
    }
}
