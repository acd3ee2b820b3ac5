//! End to end in a real browser: `rollguard ui` on a real fleet, driven in
//! headless Chromium (Debian's `chromium` and `chromium-driver`).
//!
//! The page is opened with the one-time link; the 2012 replay is rolled
//! out; the canary's denied paths and HALTED appear without a reload; a
//! kill issued from the page is acknowledged by every agent. A viewer's
//! page is refused the kill by the controller's role rules, and the link,
//! a request without the session and a foreign Host name are refused. A
//! halt and a resume from the page each reach the controller with their
//! reason, and the page survives a controller restart.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use rollguard_tests::browser::Browser;
use rollguard_tests::fleet::{manifest, script, Fleet};

const HOSTS: &[(&str, &[(&str, &str)])] = &[
    ("mail-01", &[("role", "mail")]),
    ("mail-02", &[("role", "mail")]),
    ("mail-03", &[("role", "mail")]),
    ("mail-04", &[("role", "mail")]),
    ("mail-05", &[("role", "mail")]),
    ("web-01", &[("role", "web")]),
];

/// A running `rollguard ui` and the link it printed.
struct Ui {
    child: Child,
    url: String,
}

impl Ui {
    fn start(mut cli: Command) -> Ui {
        let mut child = cli
            .args(["ui", "--json"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start rollguard ui");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the link");
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let url = v["url"].as_str().expect("url").to_string();
        assert!(
            url.starts_with("http://127.0.0.1:"),
            "loopback by default: {url}"
        );
        Ui { child, url }
    }

    /// `127.0.0.1:PORT`.
    fn authority(&self) -> &str {
        let rest = self.url.strip_prefix("http://").unwrap();
        &rest[..rest.find('/').unwrap()]
    }

    /// The status code of a bare GET with this Host header and no session.
    fn status_of(&self, path: &str, host: &str) -> u16 {
        self.request(&format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        ))
    }

    /// The status code of a request written by hand.
    fn request(&self, raw: &str) -> u16 {
        let mut s = TcpStream::connect(self.authority()).unwrap();
        s.write_all(raw.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line: {answer}"))
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_web_view_shows_the_2012_replay_halting_live_and_kills_from_the_page() {
    let mut fleet = Fleet::new(HOSTS);
    fleet.start_controller();
    fleet.start_agents();
    let browser = Browser::start();

    // A viewer's page: it reads, and the controller refuses its kill.
    fleet.enroll_person("val", "viewer");
    let viewer = Ui::start(fleet.cli_as("val"));
    browser.goto(&viewer.url);
    browser.wait_for_text("#fleet-count", "6 connected", "the viewer's fleet page");
    browser.click("#kill-all");
    browser.fill("#confirm-reason", "a viewer tries");
    browser.click("#confirm-ok");
    browser.wait_for_text(
        "#confirm-error",
        "viewer certificates may not call",
        "the controller's refusal of a viewer's kill",
    );
    drop(viewer);

    let ui = Ui::start(fleet.cli());
    let authority = ui.authority().to_string();
    // Without the link, nothing: not the page, not its script, not the API.
    for path in ["/", "/app.js", "/app.css", "/api/agents", "/api/events"] {
        assert_eq!(
            ui.status_of(path, &authority),
            401,
            "{path} without the token"
        );
    }
    browser.goto(&ui.url);
    assert!(
        !browser.current_url().contains("token"),
        "the token leaves the address bar: {}",
        browser.current_url()
    );
    browser.wait_for_text("#health", "Live", "the event stream");
    // The link is spent; its token is no session either.
    let token = &ui.url[ui.url.find("token=").unwrap() + 6..];
    assert_eq!(
        ui.status_of(&format!("/?token={token}"), &authority),
        403,
        "the link works once"
    );
    assert_eq!(
        ui.status_of(&format!("/api/events?session={token}"), &authority),
        401,
        "the token is no session"
    );
    // The session was in that one answer only: a reload (no token now)
    // gets the page without it, and the page takes it from its storage.
    let session = browser.eval("return localStorage.getItem('rollguard-session');");
    let session = session.as_str().expect("a session in storage").to_string();
    browser.eval("window.beforeReload = 1; return null;");
    browser.block_on(browser.client().refresh()).unwrap();
    browser.wait_for_text("#health", "Live", "the reloaded page");
    assert_eq!(
        browser.eval("return window.beforeReload === undefined;"),
        serde_json::json!(true),
        "a new page"
    );
    assert!(
        !browser.source().contains(&session),
        "the session is not in the page again"
    );
    assert_eq!(
        ui.status_of("/", &authority.replace("127.0.0.1", "rebound.example")),
        421,
        "another host name (DNS rebinding) is refused"
    );

    // Fleet: every host, filtered by label.
    browser.wait_for_text(
        "#fleet-count",
        "6 of 6 hosts shown; 6 connected",
        "the fleet",
    );
    let table = browser.text_of("#fleet-table");
    for (host, _) in HOSTS {
        assert!(table.contains(host), "{host} listed: {table}");
    }
    assert!(
        table.contains("CONNECTED") && table.contains("role=web"),
        "{table}"
    );
    browser.fill("#fleet-filter", "role=web");
    browser.wait_for_text("#fleet-count", "1 of 6 hosts shown", "the label filter");
    assert!(!browser.text_of("#fleet-table").contains("mail-01"));

    // A mark that a reload would erase.
    browser.eval("window.rollguardNoReload = 2012; return null;");
    browser.click("#nav-rollouts");
    browser.wait_for_text("#rollouts-table", "No rollouts yet", "the empty list");

    // The 2012 program: a mail fix with a stray delete of customer data.
    let bundle = fleet.incident_bundle();
    let id = fleet.start_rollout(
        &bundle,
        &["--waves", "1,100%", "--bake", "1s", "--canary", "mail-03"],
    );
    browser.wait_for_text("#rollouts-table", &id, "the new rollout, pushed");
    browser.click(&format!("a[href='#/rollouts/{id}']"));
    browser.wait_for_text("#rollout-state", "HALTED", "the halt, pushed");
    browser.wait_for_text("#halt-reason", "denied", "the halt reason");
    browser.wait_for_text("#denials", "customers/mail-03", "the canary's denied path");
    browser.wait_for_text("#hosts", "PENDING", "the hosts that never ran");
    browser.wait_for_text("#waves", "Wave 1: 1 of 1 hosts reported", "wave progress");
    // Progress is announced as well as drawn.
    assert_eq!(
        browser.eval(
            "return [...document.querySelectorAll('[role=progressbar]')]\
             .map(b => [b.getAttribute('aria-valuenow'), b.getAttribute('aria-valuemax')]);"
        ),
        serde_json::json!([["1", "1"], ["0", "4"]])
    );
    assert_eq!(
        browser.eval("return window.rollguardNoReload;"),
        serde_json::json!(2012),
        "the page was never reloaded"
    );
    // The list: hosts counted by state, the denials counted.
    browser.click("#nav-rollouts");
    browser.wait_for_text("#rollouts-table", "3 DENIED", "the list's denial count");
    let list = browser.text_of("#rollouts-table");
    assert!(list.contains("5 (4 pending, 1 succeeded)"), "{list}");
    assert!(list.contains("HALTED"), "{list}");
    browser.click(&format!("a[href='#/rollouts/{id}']"));
    browser.wait_for_text("#rollout-state", "HALTED", "the rollout page again");
    // The README's screenshot comes from here.
    if let Some(path) = std::env::var_os("ROLLGUARD_UI_SCREENSHOT") {
        browser.screenshot(std::path::Path::new(&path));
    }

    // The bundle's blast radius.
    browser.click("#bundle-link");
    browser.wait_for_text("#bundle", "mail-fix-2012 v1", "the bundle page");
    let b = browser.text_of("#bundle");
    assert!(b.contains("mail-*") && b.contains("Signers (1)"), "{b}");

    // The kill, one click away on every page, acknowledged by every agent.
    // Escape cancels it from the keyboard.
    browser.click("#kill-all");
    browser.fill("#confirm-reason", "\u{E00C}");
    assert_eq!(
        browser.eval("return document.getElementById('confirm').open;"),
        serde_json::json!(false),
        "Escape closes the dialog"
    );
    browser.click("#kill-all");
    browser.click("#confirm-ok");
    browser.wait_for_text(
        "#confirm-error",
        "A reason is required",
        "no kill without a reason",
    );
    browser.fill("#confirm-reason", "2012 replay: stop everything");
    browser.click("#confirm-ok");
    browser.wait_for_text(
        "#action-result",
        "Acknowledged by 6 of 6 connected agents",
        "every agent's acknowledgement",
    );
    assert!(
        browser
            .text_of("#action-result")
            .contains("Every connected agent acknowledged"),
        "{}",
        browser.text_of("#action-result")
    );
    browser.wait_for_text("#kill-banner", "KILL SWITCH ENGAGED", "the kill banner");
    let kill = fleet.cli_json(&["kill", "--status"]);
    assert_eq!(
        kill["all"]["reason"], "2012 replay: stop everything",
        "{kill:#}"
    );
}

/// The operator log's entries of `action`, their details as JSON.
fn operator_log(fleet: &Fleet, action: &str) -> Vec<serde_json::Value> {
    let config =
        rollguard_controller::config::ControllerConfig::load(&fleet.ctl().join("controller.toml"))
            .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let entries = rt.block_on(async {
        let store = rollguard_controller::store::open(&config.storage)
            .await
            .unwrap()
            .store;
        store.operator_log_entries().await.unwrap()
    });
    entries
        .into_iter()
        .filter(|e| e.action == action)
        .map(|e| serde_json::from_str(&e.detail).unwrap())
        .collect()
}

#[test]
fn halt_and_resume_from_the_page_each_with_its_reason() {
    let mut fleet = Fleet::new(&HOSTS[..3]);
    fleet.start_controller();
    fleet.start_agents();
    let browser = Browser::start();
    let ui = Ui::start(fleet.cli());
    browser.goto(&ui.url);
    browser.wait_for_text("#fleet-count", "3 connected", "the fleet");
    // A long bake after the first wave keeps the rollout running.
    let bundle = fleet.bundle(
        "fix",
        &manifest("mail-fix", 1, "\"mail-*\"", "1m"),
        &script("touch \"$H/fixed\""),
    );
    let id = fleet.start_rollout(&bundle, &["--waves", "1,100%", "--bake", "10m"]);
    browser.eval(&format!("location.hash = '#/rollouts/{id}'; return null;"));
    browser.wait_for_text("#rollout-state", "RUNNING", "the running rollout");
    browser.wait_for_text(
        "#waves",
        "Wave 1: 1 of 1 hosts reported (current)",
        "wave 1 baking",
    );

    browser.click("#halt");
    browser.fill("#confirm-reason", "hold: the 2012 review first");
    browser.click("#confirm-ok");
    browser.wait_for_text("#action-result", "is HALTED", "the halt's answer");
    browser.wait_for_text("#rollout-state", "HALTED", "the halt, pushed");
    browser.wait_for_text("#halt-reason", "hold: the 2012 review first", "its reason");

    browser.click("#resume");
    browser.fill("#confirm-reason", "review done");
    browser.click("#confirm-ok");
    browser.wait_for_text("#action-result", "is RUNNING", "the resume's answer");
    browser.wait_for_text("#rollout-state", "RUNNING", "the resume, pushed");
    // The summaries the list page reads, newest first within a limit.
    let client = rollguard_cli::client::Client::connect_with(
        &fleet.url(),
        &fleet.ctl().join("ca.crt"),
        &fleet.ctl().join("operator.crt"),
        &fleet.ctl().join("operator.key"),
    )
    .unwrap();
    let summaries: serde_json::Value = client.get("/v1/rollouts?summary=true&limit=5").unwrap();
    assert_eq!(summaries[0]["id"], id.as_str(), "{summaries:#}");
    assert_eq!(summaries[0]["hosts"], 3);
    assert_eq!(summaries[0]["host_states"]["succeeded"], 1, "{summaries:#}");
    assert!(
        summaries[0].get("plan").is_none(),
        "no plan, no reports: {summaries:#}"
    );
    let none: serde_json::Value = client.get("/v1/rollouts?limit=0").unwrap();
    assert_eq!(none, serde_json::json!([]));
    assert!(client
        .get::<serde_json::Value>("/v1/rollouts?sumary=true")
        .is_err());
    let resumes = operator_log(&fleet, "rollout.resume");
    assert_eq!(resumes.len(), 1, "{resumes:?}");
    assert_eq!(resumes[0]["reason"], "review done", "{resumes:?}");
    assert_eq!(resumes[0]["rollout"], id.as_str());
    // Only the first wave's host ran: the rest wait for the bake.
    let ran: usize = ["mail-01", "mail-02", "mail-03"]
        .iter()
        .map(|h| fleet.runs_on(h).len())
        .sum();
    assert_eq!(ran, 1);

    // The controller goes away and comes back: the page says so, greys
    // out what it shows, and recovers on its own, still without a reload.
    browser.eval("window.rollguardNoReload = 1; return null;");
    fleet.kill_controller();
    browser.wait_for_text(
        "#health",
        "CONTROLLER UNREACHABLE",
        "the controller's absence",
    );
    assert_eq!(
        browser.eval("return document.getElementById('main').classList.contains('stale');"),
        serde_json::json!(true)
    );
    fleet.start_controller();
    browser.wait_for_text("#health", "Live", "the controller back");
    browser.wait_for_text(
        "#rollout-state",
        "RUNNING",
        "the rollout, after the restart",
    );
    assert_eq!(
        browser.eval("return document.getElementById('main').classList.contains('stale') ? 0 : window.rollguardNoReload;"),
        serde_json::json!(1)
    );
}
