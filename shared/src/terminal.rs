//! Text from a bundle or a host, printed on an operator's terminal.
//!
//! A bundle writes its own stdout and stderr, and names the files it
//! touches; a host's report quotes them, and the controller's halt reasons
//! quote the report (`rollout status`, `rollout changes`): printed raw, an escape sequence (`ESC [ 2 J`, cursor moves, an
//! OSC title or hyperlink), a carriage return or backspaces could erase or
//! overwrite the report's DENIED block above it, and a bidirectional
//! override could reorder what the operator reads. So every such string is
//! printed with its control and format characters escaped (`\x1b`, `\r`,
//! `\u{202e}`), which leaves ordinary text, tabs and UTF-8 untouched.
//! (`--json` output needs none of this: JSON escapes every control
//! character, and the terminal sees `\u001b`.)

use std::fmt::Write;

/// `text` with every character that could move the cursor, change the
/// terminal's state or reorder the display escaped. Line breaks are escaped
/// too: the caller splits lines first if it wants them.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\t' => out.push(c),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() || is_format(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Invisible characters that change how the text around them is shown:
/// zero-width characters, bidirectional marks, embeddings, overrides and
/// isolates, the byte-order mark, and interlinear annotations.
fn is_format(c: char) -> bool {
    matches!(c,
        '\u{00ad}' | '\u{061c}' | '\u{180e}'
        | '\u{200b}'..='\u{200f}'
        | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{206f}'
        | '\u{feff}'
        | '\u{fff9}'..='\u{fffb}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_hide_a_line() {
        let hostile =
            "ok\x1b[1A\x1b[2K  denials: none\r\x08\x08\x1b]0;title\x07\u{9b}31m\u{202e}gnp.exe";
        let shown = printable(hostile);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown}");
        assert_eq!(
            shown,
            "ok\\x1b[1A\\x1b[2K  denials: none\\r\\x08\\x08\\x1b]0;title\\x07\\u{9b}31m\\u{202e}gnp.exe"
        );
    }

    #[test]
    fn leaves_ordinary_text_alone() {
        assert_eq!(
            printable("queue_lifetime = 2d\tok é 日本"),
            "queue_lifetime = 2d\tok é 日本"
        );
        // A backslash is doubled, so an escape cannot be faked either.
        assert_eq!(printable("a\\x1b"), "a\\\\x1b");
    }
}
