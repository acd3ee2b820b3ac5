//! The page, its script and its style, compiled into the binary. Plain
//! HTML, CSS and JavaScript with no framework and no build step: a few
//! tens of KiB, nothing fetched at run time.

pub const INDEX_HTML: &str = include_str!("assets/index.html");
pub const APP_JS: &str = include_str!("assets/app.js");
pub const APP_CSS: &str = include_str!("assets/app.css");
