//! Capturing service requests inside the sandbox (docs/services.md).
//!
//! Programs a bundle runs (a package's maintainer scripts above all) ask
//! for service actions with `systemctl`, `deb-systemd-invoke`,
//! `invoke-rc.d`, `service`, or Debian's `/usr/sbin/policy-rc.d`
//! convention. Inside the sandbox there is no bus to reach systemd, and
//! there must not be: a request is *recorded*, not performed, and the agent
//! decides after the run what to do with it. The one exception changes
//! files only: a unit-file verb given `--root` (`systemctl --root=/ preset
//! UNIT`, which `deb-systemd-helper` runs on a first install) is recorded
//! and then run by the real `systemctl`, confined like any write
//! ([`OFFLINE_UNIT_FILE_VERBS`]).
//!
//! How: stage 2 puts a read-only directory first on the bundle's `PATH`,
//! [`SHIM_DIR`], holding symbolic links named after those programs to the
//! stage-2 program itself, which dispatches on the name it was called by
//! ([`shim_name`], then [`shim_main`]). Why the stage-2 program: it is
//! already installed root-owned beside the agent, protected from writes
//! and readable by every bundle; a link to it adds nothing a bundle could
//! replace, and no script to generate per run. The links sit on a
//! read-only mount, so the bundle cannot replace them either.
//!
//! Each request is one JSON line appended to [`REQUESTS_FILE`], on a small
//! tmpfs of the run's own ([`REQUESTS_TMPFS_BYTES`]; never a directory of
//! the host's file systems, which the bundle could fill). Stage 2 creates
//! the file before the bundle starts and makes it append-only
//! (`FS_APPEND_FL`; clearing it takes `CAP_LINUX_IMMUTABLE`, which the
//! bundle does not have), and Landlock lets the bundle create nothing else
//! there: so a bundle can add lines, which is no more than calling a shim,
//! but never truncate, overwrite, rename or remove the lines before, a
//! denied request above all. Stage 2 hands that directory, opened, to the
//! agent before the bundle starts; the agent reads the record through it
//! after the run ([`read_records`]) and parses it strictly
//! ([`parse_records`]): bounded size, known fields only, a plain verb, a
//! valid unit name. A record it cannot read in full fails the run
//! and is itself reported as a denial (a line it cannot read may have been
//! written to hide a request), and no service action is performed.

use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use rollguard_shared::services::{
    ActionSource, CapturedRequest, PlannedAction, ServiceAction, UnitName,
};
use serde::{Deserialize, Serialize};

/// Where the links live inside the sandbox (first on `PATH`).
pub const SHIM_DIR: &str = "/run/rollguard/bin";
/// The writable directory the requests are recorded in, inside the sandbox.
pub const REQUESTS_DIR: &str = "/run/rollguard/requests";
/// The record, inside the sandbox.
pub const REQUESTS_FILE: &str = "/run/rollguard/requests/requests.jsonl";
/// The record's name in [`REQUESTS_DIR`].
pub const REQUESTS_NAME: &str = "requests.jsonl";
/// Size of the tmpfs on [`REQUESTS_DIR`]: room for a record larger than
/// [`MAX_RECORD_BYTES`], so a flood is seen as one (and fails the run),
/// and no more (it lives in the host's RAM).
pub const REQUESTS_TMPFS_BYTES: u64 = 2 * MAX_RECORD_BYTES;
/// Inodes of that tmpfs (its root included): the record and a few others.
pub const REQUESTS_TMPFS_INODES: u64 = 16;
/// The programs captured; each is a link in [`SHIM_DIR`].
pub const SHIMS: [&str; 5] = [
    "systemctl",
    "deb-systemd-invoke",
    "invoke-rc.d",
    "service",
    "policy-rc.d",
];
/// Largest record file read (a thousand requests or so: the size bounds
/// their number).
pub const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// Most requests listed in a report (the denied ones first); every one is
/// decided all the same.
pub const MAX_LISTED: usize = 256;

/// One recorded request, as a line of [`REQUESTS_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Which shim caught it (one of [`SHIMS`]).
    pub via: String,
    /// The verb as given (`restart`, `daemon-reload`, ...).
    pub verb: String,
    /// The unit, `NAME.service` for a bare name; empty for verbs without
    /// one (`daemon-reload`, `reboot`).
    #[serde(default)]
    pub unit: String,
}

/// The shim `argv0` names, if it is one (its file name).
pub fn shim_name(argv0: &std::ffi::OsStr) -> Option<&'static str> {
    let name = Path::new(argv0).file_name()?.to_str()?;
    SHIMS.iter().copied().find(|s| *s == name)
}

// ---- what verbs mean -------------------------------------------------------

/// Verbs that only read state: answered without a bus, never recorded.
const QUERY_VERBS: &[&str] = &[
    "is-active",
    "is-failed",
    "is-enabled",
    "is-system-running",
    "status",
    "show",
    "cat",
    "help",
    "list-units",
    "list-unit-files",
    "list-sockets",
    "list-timers",
    "list-jobs",
    "list-dependencies",
    "list-automounts",
    "list-paths",
    "get-default",
    "show-environment",
];

/// Verbs with no effect on running code beyond the unit-file verbs
/// ([`OFFLINE_UNIT_FILE_VERBS`], which are ignored too): recorded, never
/// performed, never a denial (enabling or masking changes what starts at
/// boot; a `daemon-reload` is made by systemd itself when the agent acts).
const IGNORED_VERBS: &[&str] = &["daemon-reload", "reset-failed"];

/// Verbs on the whole system, not on the unit named (power, the default
/// target, the manager itself): never performed, and a denial whatever
/// unit is given (`systemctl isolate ALLOWED.service` stops everything
/// else).
const SYSTEM_VERBS: &[&str] = &[
    "isolate",
    "halt",
    "poweroff",
    "reboot",
    "soft-reboot",
    "kexec",
    "exit",
    "switch-root",
    "rescue",
    "emergency",
    "default",
    "suspend",
    "hibernate",
    "hybrid-sleep",
    "suspend-then-hibernate",
    "sleep",
    "daemon-reexec",
    "set-default",
    "set-environment",
    "unset-environment",
    "import-environment",
];

/// Unit-file verbs that `systemctl --root=DIR` performs on the file system
/// itself, talking to no service manager: `deb-systemd-helper enable`
/// runs `systemctl --root=/ preset UNIT` on a package's first install.
/// With `--root`, the shim records the call and then runs the real
/// `systemctl` ([`REAL_SYSTEMCTL`]) with the same arguments, inside the
/// sandbox: the links it makes are files like any other, confined by the
/// scope (a package's derived scope holds its units' `.wants`
/// directories). This gives a bundle nothing it lacks: it could run the
/// real program by its path.
const OFFLINE_UNIT_FILE_VERBS: &[&str] = &[
    "enable",
    "disable",
    "reenable",
    "preset",
    "preset-all",
    "mask",
    "unmask",
    "link",
    "revert",
    "add-wants",
    "add-requires",
];

/// Where the real `systemctl` is installed (Debian, Fedora).
const REAL_SYSTEMCTL: [&str; 2] = ["/usr/bin/systemctl", "/bin/systemctl"];

/// What the agent does with a recorded verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerbClass {
    /// Performed (if the unit is allowed) as this action.
    Perform(ServiceAction),
    /// Recorded, never performed, never a denial.
    Ignored,
    /// Any other verb (`start`, `stop`, `kill`...): not performed; a
    /// denial unless the unit is allowed (then ignored). A patch reloads
    /// or restarts what runs; it does not change what runs.
    NotPerformed,
    /// A verb on the whole system ([`SYSTEM_VERBS`]): never performed, a
    /// denial whatever the unit.
    System,
}

/// The mapping (docs/services.md). Every restart-like verb becomes
/// `try_restart`: a service the operator stopped stays stopped, and a
/// running one is restarted as the script asked. `force-reload` and the
/// reload-or-restart family become `try_restart` too, since a restart
/// includes what a reload would do and works for units without
/// `ExecReload=`.
pub fn classify_verb(verb: &str) -> VerbClass {
    match verb {
        "reload" => VerbClass::Perform(ServiceAction::Reload),
        "restart"
        | "try-restart"
        | "condrestart"
        | "force-reload"
        | "reload-or-restart"
        | "try-reload-or-restart"
        | "reload-or-try-restart" => VerbClass::Perform(ServiceAction::TryRestart),
        v if IGNORED_VERBS.contains(&v) || OFFLINE_UNIT_FILE_VERBS.contains(&v) => {
            VerbClass::Ignored
        }
        v if SYSTEM_VERBS.contains(&v) => VerbClass::System,
        _ => VerbClass::NotPerformed,
    }
}

/// A verb the record can hold: 1-64 of `a-z`, `0-9` and `-`, as
/// systemctl's verbs are. The shims refuse any other (systemctl would
/// too), so a script's typo never makes the record unreadable.
pub fn is_plain_verb(verb: &str) -> bool {
    !verb.is_empty()
        && verb.len() <= 64
        && verb
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

// ---- the shim ----------------------------------------------------------------

/// `systemctl` normalises a bare name to `NAME.service`.
fn unit_of(raw: &str) -> String {
    match raw.rsplit_once('.') {
        Some((_, suffix)) if rollguard_shared::services::UNIT_TYPES.contains(&suffix) => {
            raw.to_string()
        }
        _ => format!("{raw}.service"),
    }
}

/// A shim's command line, parsed.
#[derive(Debug, PartialEq, Eq)]
enum Call {
    /// Record these and exit with this code.
    Record(Vec<Record>, u8),
    /// Print this (stdout) and exit with this code; nothing recorded.
    Answer(String, u8),
    /// Usage error: message on stderr, exit 1 (nothing recorded).
    Usage(String),
    /// Record these, then run the real `systemctl` with the same
    /// arguments (a unit-file verb with `--root`, see
    /// [`OFFLINE_UNIT_FILE_VERBS`]).
    RecordThenOffline(Vec<Record>),
    /// Record these, then fail with this message (exit 1): a request the
    /// shim refuses is still an attempt the agent reports.
    Refuse(Vec<Record>, String),
}

/// systemctl's short options that take a value (attached, or the next
/// argument).
const SHORT_VALUE_OPTIONS: &[char] = &['p', 'P', 't', 's', 'H', 'M', 'o', 'n'];

/// systemctl's long options that take a separate value (`--host` and
/// `--machine` are handled on their own).
const SYSTEMCTL_VALUE_OPTIONS: &[&str] = &[
    "--property",
    "--type",
    "--signal",
    "--state",
    "--job-mode",
    "--output",
    "--lines",
    "--root",
    "--kill-whom",
    "--what",
    "--timestamp",
    "--boot-loader-entry",
    "--reboot-argument",
    "--preset-mode",
    "--message",
];

fn parse_systemctl(via: &str, args: &[String]) -> Call {
    let mut words = Vec::new();
    let mut quiet = false;
    let mut user = false;
    let mut root = false;
    let mut remote = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--" {
            words.extend(it.by_ref().cloned());
            break;
        }
        if a == "--version" {
            return Call::Answer(
                "systemd 252 (rollguard sandbox: requests are captured)\n".into(),
                0,
            );
        }
        if a == "-q" || a == "--quiet" {
            quiet = true;
        } else if a == "--user" || a == "--global" {
            user = true;
        } else if a == "--root" {
            // An empty value is no root to systemctl either.
            root = it.next().is_some_and(|v| !v.is_empty());
        } else if let Some(value) = a.strip_prefix("--root=") {
            root = !value.is_empty();
        } else if a == "--host" || a == "--machine" {
            // Another machine's manager: see below.
            remote = true;
            it.next();
        } else if a.starts_with("--host=") || a.starts_with("--machine=") {
            remote = true;
        } else if let Some(cluster) = a
            .strip_prefix('-')
            .filter(|c| !c.is_empty() && !c.starts_with('-'))
        {
            // Short options, possibly clustered (`-qH host`, `-Mctr`,
            // `-pMainPID`): one that takes a value takes the rest of the
            // cluster, or the next argument.
            for (i, c) in cluster.char_indices() {
                if SHORT_VALUE_OPTIONS.contains(&c) {
                    // -H/-M: another machine's manager (see below).
                    remote |= c == 'H' || c == 'M';
                    if i + c.len_utf8() == cluster.len() {
                        it.next();
                    }
                    break;
                }
                quiet |= c == 'q';
            }
        } else if SYSTEMCTL_VALUE_OPTIONS.contains(&a.as_str()) {
            it.next();
        } else if !a.starts_with('-') {
            words.push(a.clone());
        }
    }
    let Some((verb, units)) = words.split_first() else {
        return Call::Usage(format!("{via}: no verb given"));
    };
    if QUERY_VERBS.contains(&verb.as_str()) {
        return answer(verb, units.len(), quiet);
    }
    if user {
        // A user manager's units: nothing of the host's services.
        return Call::Record(Vec::new(), 0);
    }
    if remote {
        // Reaching another machine's or a container's manager from a
        // run is an attempt: recorded as the verb on no unit (a denial,
        // see `classify`), never performed on the host's unit of the same
        // name, and refused here.
        return Call::Refuse(
            vec![Record {
                via: via.into(),
                verb: verb.clone(),
                unit: String::new(),
            }],
            format!("{via}: -H/-M: another machine's service manager cannot be reached from a rollguard run"),
        );
    }
    let records = if units.is_empty() {
        vec![Record {
            via: via.into(),
            verb: verb.clone(),
            unit: String::new(),
        }]
    } else {
        units
            .iter()
            .map(|u| Record {
                via: via.into(),
                verb: verb.clone(),
                unit: unit_of(u),
            })
            .collect()
    };
    if root && OFFLINE_UNIT_FILE_VERBS.contains(&verb.as_str()) {
        return Call::RecordThenOffline(records);
    }
    Call::Record(records, 0)
}

/// Answers to queries without a bus (docs/services.md): units are said to
/// be active and enabled, so a script asks for what it would ask on a
/// running system; the agent then acts on systemd's real state (a captured
/// restart is a try-restart, which leaves a stopped service stopped).
fn answer(verb: &str, units: usize, quiet: bool) -> Call {
    let lines = |word: &str| {
        if quiet {
            String::new()
        } else {
            format!("{word}\n").repeat(units.max(1))
        }
    };
    match verb {
        "is-active" => Call::Answer(lines("active"), 0),
        "is-enabled" => Call::Answer(lines("enabled"), 0),
        // Not failed: exit 1, as systemctl does for a unit not failed.
        "is-failed" => Call::Answer(lines("active"), 1),
        "is-system-running" => Call::Answer(
            if quiet {
                String::new()
            } else {
                "running\n".into()
            },
            0,
        ),
        // status, show, cat, list-*: nothing to show, and nothing wrong.
        _ => Call::Answer(String::new(), 0),
    }
}

fn parse_deb_systemd_invoke(args: &[String]) -> Call {
    let mut user = false;
    let mut rest = Vec::new();
    for a in args {
        match a.as_str() {
            "--user" => user = true,
            "--system" => user = false,
            _ => rest.push(a.clone()),
        }
    }
    if rest.len() < 2 {
        return Call::Usage(
            "Syntax: deb-systemd-invoke <action> <unit file> [<unit file> ...]".into(),
        );
    }
    if user {
        return Call::Record(Vec::new(), 0);
    }
    let verb = &rest[0];
    let records = rest[1..]
        .iter()
        .map(|u| Record {
            via: "deb-systemd-invoke".into(),
            verb: verb.clone(),
            unit: unit_of(u),
        })
        .collect();
    Call::Record(records, 0)
}

/// `invoke-rc.d [options] NAME ACTION [args]` and `service NAME ACTION`.
fn parse_name_action(via: &str, args: &[String]) -> Call {
    let mut words = Vec::new();
    for a in args {
        match a.as_str() {
            "--query" if via == "invoke-rc.d" => {
                // 105: "behaviour uncertain, policy undefined".
                return Call::Answer(String::new(), 105);
            }
            "--status-all" | "--help" | "-h" if via == "service" => {
                return Call::Answer(String::new(), 0)
            }
            s if s.starts_with("--") && words.is_empty() => {}
            _ => words.push(a.clone()),
        }
    }
    if words.len() < 2 {
        return Call::Usage(format!("{via}: usage: {via} NAME ACTION"));
    }
    // `service NAME --full-restart`: a stop and a start, a restart.
    let verb = match words[1].as_str() {
        "--full-restart" if via == "service" => "restart".to_string(),
        v => v.to_string(),
    };
    if verb == "status" {
        return Call::Answer(String::new(), 0);
    }
    Call::Record(
        vec![Record {
            via: via.into(),
            verb,
            unit: unit_of(&words[0]),
        }],
        0,
    )
}

/// `policy-rc.d [options] NAME "ACTION [fallback...]" [runlevel]`: record
/// the first action, exit 101 ("action forbidden by policy"), so the
/// caller does not perform it.
fn parse_policy_rc_d(args: &[String]) -> Call {
    let words: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    if words.len() < 2 {
        return Call::Answer(String::new(), 101);
    }
    let verb = words[1].split_whitespace().next().unwrap_or("").to_string();
    if !is_plain_verb(&verb) {
        // Forbidden, and nothing the record could hold.
        return Call::Answer(String::new(), 101);
    }
    Call::Record(
        vec![Record {
            via: "policy-rc.d".into(),
            verb,
            unit: unit_of(words[0]),
        }],
        101,
    )
}

fn parse_call(via: &str, args: &[String]) -> Call {
    match via {
        "systemctl" => parse_systemctl(via, args),
        "deb-systemd-invoke" => parse_deb_systemd_invoke(args),
        "policy-rc.d" => parse_policy_rc_d(args),
        _ => parse_name_action(via, args),
    }
}

/// The shim: `via` is its name (one of [`SHIMS`]). Records and answers;
/// performs nothing itself (a unit-file verb with `--root` is handed to
/// the real `systemctl`, see [`OFFLINE_UNIT_FILE_VERBS`]).
pub fn shim_main(via: &'static str, args: impl Iterator<Item = std::ffi::OsString>) -> ExitCode {
    let args: Vec<String> = args
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match parse_call(via, &args) {
        Call::RecordThenOffline(mut records) => {
            // A name the record cannot hold (a template `foo@.service`,
            // a unit file's path for `link`) is the real systemctl's to
            // judge; the verb is never performed by the agent anyway.
            records.retain(|r| r.unit.is_empty() || UnitName::parse(&r.unit).is_ok());
            if let Err(e) = append(&records) {
                return cannot_record(via, &e);
            }
            // The real program, never this shim again (a package could
            // have made one of these paths a link to it). Without one there
            // is nothing to apply the change with: answered as before.
            for real in REAL_SYSTEMCTL {
                if Path::new(real).is_file() && !is_this_program(Path::new(real)) {
                    use std::os::unix::process::CommandExt;
                    let error = std::process::Command::new(real)
                        .arg0(via)
                        .args(&args)
                        .exec();
                    say(&format!("{via}: cannot run {real}: {error}"));
                    return ExitCode::from(1);
                }
            }
            ExitCode::SUCCESS
        }
        Call::Answer(out, code) => {
            // A closed stdout (`systemctl is-active x | head -0`) is no
            // reason to fail, and never a panic.
            let _ = std::io::stdout().write_all(out.as_bytes());
            ExitCode::from(code)
        }
        Call::Usage(msg) => {
            say(&msg);
            ExitCode::from(1)
        }
        Call::Refuse(records, msg) => {
            if let Err(e) = record(records) {
                return cannot_record(via, &e);
            }
            say(&msg);
            ExitCode::from(1)
        }
        Call::Record(records, code) => {
            let (records, refused) = match record(records) {
                Ok(recorded) => recorded,
                Err(e) => return cannot_record(via, &e),
            };
            if let Some(why) = refused {
                say(&format!("{via}: {why}"));
                // policy-rc.d's callers read 101 as "forbidden": never
                // anything that could mean "go ahead".
                return ExitCode::from(if code == 101 { 101 } else { 1 });
            }
            for r in &records {
                say(&format!(
                    "{via}: {} {} captured by rollguard; the agent acts on it after the run if the host allows it",
                    r.verb, r.unit
                ));
            }
            ExitCode::from(code)
        }
    }
}

/// The verb recorded for one the record cannot hold (not 1-64 of `a-z`,
/// `0-9`, `-`): not performed, a denial unless the unit is allowed.
pub const UNRECOGNIZED_VERB: &str = "unrecognized";

/// Make `records` what the record can hold, and say what the shim refuses
/// (it exits non-zero then, as systemctl would): a verb it cannot hold is
/// recorded as [`UNRECOGNIZED_VERB`], a unit name systemd would refuse (a
/// glob, a path) as no unit. Either way the request is still an attempt
/// the agent decides on (on no unit, a verb with effect is a denial), and
/// a script's `|| true` cannot make it vanish.
fn holdable(records: &mut Vec<Record>) -> Option<String> {
    let mut refused = None;
    for r in records.iter_mut() {
        if !is_plain_verb(&r.verb) {
            refused.get_or_insert_with(|| format!("unknown verb {:?}", r.verb));
            r.verb = UNRECOGNIZED_VERB.to_string();
        }
        if !r.unit.is_empty() && UnitName::parse(&r.unit).is_err() {
            refused.get_or_insert_with(|| format!("invalid unit name {:?}", r.unit));
            r.unit.clear();
        }
    }
    records.dedup();
    refused
}

/// Append `records` as the record can hold them ([`holdable`]): what was
/// recorded, and what the shim refuses, if anything.
fn record(mut records: Vec<Record>) -> std::io::Result<(Vec<Record>, Option<String>)> {
    let refused = holdable(&mut records);
    append(&records)?;
    Ok((records, refused))
}

/// A message on stderr; a closed stderr is no reason to panic (the request
/// is recorded by then).
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn cannot_record(via: &str, e: &std::io::Error) -> ExitCode {
    say(&format!("{via}: cannot record the request in {REQUESTS_FILE}: {e} (this program only works inside a rollguard run)"));
    ExitCode::from(1)
}

/// Whether `path` is the program running now (same file, followed).
fn is_this_program(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), std::fs::metadata("/proc/self/exe")) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        // Cannot tell: do not run it.
        _ => true,
    }
}

fn append(records: &[Record]) -> std::io::Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).map_err(std::io::Error::other)?);
        text.push('\n');
    }
    if text.is_empty() {
        return Ok(());
    }
    // Stage 2 created it, append-only: never created here.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(REQUESTS_FILE)?;
    // One write: appends of a few hundred bytes do not interleave.
    f.write_all(text.as_bytes())
}

// ---- the agent's side --------------------------------------------------------

/// The record as read: every request on a line that could be read, and
/// why the record could not be read in full, if it could not (the first
/// problem: too large, a line not in UTF-8 or that is not
/// exactly a [`Record`] with a known shim, a plain verb and a valid unit
/// name). Shims write only lines that parse, so an unreadable record is
/// one the bundle wrote itself, perhaps to hide a request: the agent
/// reports it as a denial and performs nothing; the requests it could
/// read are reported all the same.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub records: Vec<Record>,
    pub unreadable: Option<String>,
}

impl Parsed {
    fn unreadable(why: String) -> Self {
        Parsed {
            records: Vec::new(),
            unreadable: Some(why),
        }
    }
}

/// Read the record the run left in `requests`, the run's [`REQUESTS_DIR`]
/// as stage 2 handed it over (opened before the bundle started; the
/// bundle's processes are all gone when this is called). No file: no
/// requests. Never follows a link, never waits on a FIFO, reads at most
/// [`MAX_RECORD_BYTES`] and one more; then [`parse_records`].
pub fn read_records(requests: std::os::fd::BorrowedFd<'_>) -> Parsed {
    use rustix::fs::{openat, Mode, OFlags};
    let what = format!("{REQUESTS_FILE} (the run's record)");
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = match openat(requests, REQUESTS_NAME, flags, Mode::empty()) {
        Ok(fd) => std::fs::File::from(fd),
        Err(rustix::io::Errno::NOENT) => return Parsed::default(),
        Err(e) => return Parsed::unreadable(format!("{what}: {e}")),
    };
    match file.metadata() {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Parsed::unreadable(format!("{what} is not a regular file")),
        Err(e) => return Parsed::unreadable(format!("{what}: {e}")),
    }
    let mut bytes = Vec::new();
    if let Err(e) = file.take(MAX_RECORD_BYTES + 1).read_to_end(&mut bytes) {
        return Parsed::unreadable(format!("{what}: {e}"));
    }
    parse_records(&bytes)
}

/// Parse the record's bytes (see [`Parsed`]): line by line, so that a bad
/// line hides none of the others.
pub fn parse_records(bytes: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    let bytes = if bytes.len() as u64 > MAX_RECORD_BYTES {
        out.unreadable = Some(format!(
            "the service request record is larger than {MAX_RECORD_BYTES} bytes"
        ));
        &bytes[..MAX_RECORD_BYTES as usize]
    } else {
        bytes
    };
    // Lossy: a line that is not UTF-8 is a bad line like any other.
    let text = String::from_utf8_lossy(bytes);
    let mut problem = |why: String| {
        out.unreadable.get_or_insert(why);
    };
    let mut records = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        let bad = |why: String| format!("service request record line {}: {why}", i + 1);
        match parse_line(line) {
            Ok(r) => records.push(r),
            Err(why) => problem(bad(why)),
        }
    }
    out.records = records;
    out
}

fn parse_line(line: &str) -> Result<Record, String> {
    if line.contains(char::REPLACEMENT_CHARACTER) {
        return Err("not UTF-8".into());
    }
    let r: Record = serde_json::from_str(line).map_err(|e| e.to_string())?;
    if !SHIMS.contains(&r.via.as_str()) {
        return Err(format!("unknown program {:?}", r.via));
    }
    if !is_plain_verb(&r.verb) {
        return Err(format!("invalid verb {:?}", r.verb));
    }
    if !r.unit.is_empty() {
        UnitName::parse(&r.unit).map_err(|e| e.to_string())?;
    }
    Ok(r)
}

/// What the captured requests come to, before anything is performed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Classified {
    /// Every request with its disposition (`performed` for the ones in
    /// `plan`, until the agent decides not to act at all).
    pub captured: Vec<CapturedRequest>,
    /// The actions to perform, for allowed units.
    pub plan: Vec<PlannedAction>,
}

impl Classified {
    /// Requests outside the host's allow list.
    pub fn denied(&self) -> impl Iterator<Item = &CapturedRequest> {
        self.captured.iter().filter(|c| c.is_denied())
    }

    /// Nothing will be performed (the caller drops the plan): the requests
    /// that were to be say `disposition` instead (`skipped`, `preview`).
    pub fn mark_unperformed(&mut self, disposition: &str) {
        for c in &mut self.captured {
            if c.disposition == "performed" {
                c.disposition = disposition.to_string();
            }
        }
    }

    /// Take the actions on the agent's own units (`own`, see
    /// [`super::own_units`]) out of the plan: their requests become
    /// `skipped`, not denied (a package of the agent itself asks for its
    /// restart on upgrade, rightly). Returns those units, for the report's
    /// reason.
    pub fn set_aside_own(&mut self, own: &[UnitName]) -> Vec<UnitName> {
        let mut set_aside: Vec<UnitName> = Vec::new();
        self.plan.retain(|p| {
            let mine = own.contains(&p.unit);
            if mine && !set_aside.contains(&p.unit) {
                set_aside.push(p.unit.clone());
            }
            !mine
        });
        for c in &mut self.captured {
            let mine = UnitName::parse(&c.unit).is_ok_and(|u| own.contains(&u));
            if mine && c.disposition == "performed" {
                c.disposition = "skipped".to_string();
            }
        }
        set_aside
    }
}

/// Decide each request against `allow`: a verb to perform on an allowed
/// unit is planned; an ignored verb is ignored; anything else with effect
/// (performable or not) on a unit outside `allow`, or on no unit at all,
/// is denied.
pub fn classify(records: &[Record], allow: &dyn Fn(&UnitName) -> bool) -> Classified {
    let mut out = Classified::default();
    for r in records {
        let unit = UnitName::parse(&r.unit).ok().filter(|u| u.is_service());
        let allowed = unit.as_ref().is_some_and(allow);
        let disposition = match classify_verb(&r.verb) {
            VerbClass::Ignored => "ignored",
            VerbClass::System => "denied",
            _ if !allowed => "denied",
            VerbClass::NotPerformed => "ignored",
            VerbClass::Perform(action) => {
                if let Some(unit) = unit {
                    out.plan.push(PlannedAction {
                        unit,
                        action,
                        source: ActionSource::Captured,
                    });
                }
                "performed"
            }
        };
        out.captured.push(CapturedRequest {
            unit: r.unit.clone(),
            verb: r.verb.clone(),
            via: r.via.clone(),
            disposition: disposition.to_string(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn verbs_are_classified_as_docs_services_md_says() {
        assert_eq!(
            classify_verb("reload"),
            VerbClass::Perform(ServiceAction::Reload)
        );
        for verb in [
            "restart",
            "try-restart",
            "force-reload",
            "reload-or-restart",
        ] {
            assert_eq!(
                classify_verb(verb),
                VerbClass::Perform(ServiceAction::TryRestart),
                "{verb}"
            );
        }
        // Every unit-file verb the shim may hand to the real systemctl is
        // ignored as a request, and so are these two.
        for verb in OFFLINE_UNIT_FILE_VERBS
            .iter()
            .chain(["daemon-reload", "reset-failed"].iter())
        {
            assert_eq!(classify_verb(verb), VerbClass::Ignored, "{verb}");
        }
        for verb in ["start", "stop", "kill", ""] {
            assert_eq!(classify_verb(verb), VerbClass::NotPerformed, "{verb}");
        }
        for verb in ["reboot", "isolate", "set-environment", "daemon-reexec"] {
            assert_eq!(classify_verb(verb), VerbClass::System, "{verb}");
        }
    }

    fn rec(via: &str, verb: &str, unit: &str) -> Record {
        Record {
            via: via.into(),
            verb: verb.into(),
            unit: unit.into(),
        }
    }

    #[test]
    fn shims_parse_what_maintainer_scripts_call() {
        assert_eq!(
            parse_call(
                "systemctl",
                &args("--system --no-block restart foo bar.service")
            ),
            Call::Record(
                vec![
                    rec("systemctl", "restart", "foo.service"),
                    rec("systemctl", "restart", "bar.service")
                ],
                0
            )
        );
        assert_eq!(
            parse_call("systemctl", &args("--system daemon-reload")),
            Call::Record(vec![rec("systemctl", "daemon-reload", "")], 0)
        );
        assert_eq!(
            parse_call("systemctl", &args("-q is-active foo.service")),
            Call::Answer(String::new(), 0)
        );
        assert_eq!(
            parse_call("systemctl", &args("is-enabled foo")),
            Call::Answer("enabled\n".into(), 0)
        );
        assert_eq!(
            parse_call("systemctl", &args("--user restart foo")),
            Call::Record(vec![], 0)
        );
        assert_eq!(
            parse_call("deb-systemd-invoke", &args("restart postfix.service")),
            Call::Record(
                vec![rec("deb-systemd-invoke", "restart", "postfix.service")],
                0
            )
        );
        assert_eq!(
            parse_call(
                "invoke-rc.d",
                &args("--skip-systemd-native postfix restart")
            ),
            Call::Record(vec![rec("invoke-rc.d", "restart", "postfix.service")], 0)
        );
        assert_eq!(
            parse_call("service", &args("postfix reload")),
            Call::Record(vec![rec("service", "reload", "postfix.service")], 0)
        );
        assert_eq!(
            parse_call("policy-rc.d", &args("--quiet postfix")),
            Call::Answer(String::new(), 101)
        );
        assert_eq!(
            parse_call(
                "policy-rc.d",
                &["postfix".to_string(), "restart start".to_string()]
            ),
            Call::Record(vec![rec("policy-rc.d", "restart", "postfix.service")], 101)
        );
        // Unit-file verbs on a root directory: recorded, then applied by
        // the real systemctl (deb-systemd-helper's first-install preset).
        assert_eq!(
            parse_call(
                "systemctl",
                &args("--root=/ --system --preset-mode=enable-only preset foo.service")
            ),
            Call::RecordThenOffline(vec![rec("systemctl", "preset", "foo.service")])
        );
        assert_eq!(
            parse_call("systemctl", &args("--root / enable foo")),
            Call::RecordThenOffline(vec![rec("systemctl", "enable", "foo.service")])
        );
        // An empty root is none.
        assert_eq!(
            parse_call("systemctl", &args("--root= preset foo.service")),
            Call::Record(vec![rec("systemctl", "preset", "foo.service")], 0)
        );
        // Not without a root, nor another verb with one.
        assert_eq!(
            parse_call("systemctl", &args("preset foo.service")),
            Call::Record(vec![rec("systemctl", "preset", "foo.service")], 0)
        );
        assert_eq!(
            parse_call("systemctl", &args("--root=/ restart foo.service")),
            Call::Record(vec![rec("systemctl", "restart", "foo.service")], 0)
        );
        assert!(matches!(parse_call("systemctl", &[]), Call::Usage(_)));
        assert!(matches!(
            parse_call("deb-systemd-invoke", &args("restart")),
            Call::Usage(_)
        ));
        assert!(shim_name("/run/rollguard/bin/systemctl".as_ref()).is_some());
        assert!(shim_name("rollguard-sandbox-exec".as_ref()).is_none());
    }

    #[test]
    fn records_parse_strictly() {
        let ok = b"{\"via\":\"systemctl\",\"verb\":\"restart\",\"unit\":\"a.service\"}\n\n{\"via\":\"systemctl\",\"verb\":\"daemon-reload\",\"unit\":\"\"}\n";
        let parsed = parse_records(ok);
        assert_eq!((parsed.records.len(), parsed.unreadable), (2, None));
        assert_eq!(parse_records(b""), Parsed::default());
        for bad in [
            &b"{\"via\":\"systemctl\",\"verb\":\"restart\",\"unit\":\"a.service\",\"x\":1}"[..],
            b"{\"via\":\"sh\",\"verb\":\"restart\",\"unit\":\"a.service\"}",
            b"{\"via\":\"systemctl\",\"verb\":\"re start\",\"unit\":\"a.service\"}",
            b"{\"via\":\"systemctl\",\"verb\":\"Restart\",\"unit\":\"a.service\"}",
            b"{\"via\":\"systemctl\",\"verb\":\"restart\",\"unit\":\"../a.service\"}",
            b"{\"via\":\"systemctl\",\"verb\":\"\",\"unit\":\"a.service\"}",
            b"not json",
            b"\xff\xfe",
            b"{\"via\":\"systemctl\",\"verb\":\"restart\",\"unit\":\"a\xff.service\"}",
            b"{\"via\":\"systemctl\"}",
        ] {
            let parsed = parse_records(bad);
            assert!(
                parsed.records.is_empty() && parsed.unreadable.is_some(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Many requests are not a problem: a large package set writes a
        // few per package; the size bounds them.
        let line = "{\"via\":\"systemctl\",\"verb\":\"restart\",\"unit\":\"a.service\"}\n";
        let many = line.repeat(1000);
        let parsed = parse_records(many.as_bytes());
        assert_eq!((parsed.records.len(), parsed.unreadable), (1000, None));
        let huge = vec![b' '; MAX_RECORD_BYTES as usize + 1];
        assert!(parse_records(&huge).unreadable.unwrap().contains("larger"));
    }

    #[test]
    fn a_bad_line_hides_none_of_the_others() {
        let text = "{\"via\":\"systemctl\",\"verb\":\"stop\",\"unit\":\"sshd.service\"}\n\
                    {\"via\":\"service\",\"verb\":\"try_restart\",\"unit\":\"a.service\"}\n\
                    garbage\n\
                    {\"via\":\"systemctl\",\"verb\":\"restart\",\"unit\":\"b.service\"}\n";
        let parsed = parse_records(text.as_bytes());
        let units: Vec<&str> = parsed.records.iter().map(|r| r.unit.as_str()).collect();
        assert_eq!(units, ["sshd.service", "b.service"]);
        assert!(
            parsed.unreadable.as_deref().unwrap().contains("line 2"),
            "the first problem is named: {parsed:?}"
        );
    }

    #[test]
    fn the_shims_record_only_what_the_record_can_hold() {
        // A verb systemctl would not know, a name systemd would refuse:
        // refused by the shim, recorded as what the record can hold (an
        // unrecognized verb, no unit), never lost.
        for (via, line) in [
            ("systemctl", "Restart a"),
            ("deb-systemd-invoke", "Restart a"),
            ("service", "a try_restart"),
            ("invoke-rc.d", "a try_restart"),
        ] {
            let Call::Record(mut records, _) = parse_call(via, &args(line)) else {
                panic!("{via}")
            };
            assert!(holdable(&mut records).unwrap().contains("unknown verb"));
            assert_eq!(records[0].verb, UNRECOGNIZED_VERB, "{via}");
            assert_eq!(records[0].unit, "a.service", "{via}");
        }
        let Call::Record(mut records, _) = parse_call("systemctl", &args("stop ssh*")) else {
            panic!()
        };
        assert!(holdable(&mut records)
            .unwrap()
            .contains("invalid unit name"));
        assert_eq!(
            (records[0].verb.as_str(), records[0].unit.as_str()),
            ("stop", "")
        );
        assert!(matches!(
            parse_call("policy-rc.d", &args("a try_restart")),
            Call::Answer(_, 101)
        ));
        assert!(is_plain_verb("try-restart") && !is_plain_verb("try_restart"));
        // `service NAME --full-restart` is a restart.
        let Call::Record(records, 0) = parse_call("service", &args("postfix --full-restart"))
        else {
            panic!()
        };
        assert_eq!(records[0].verb, "restart");
    }

    #[test]
    fn another_machines_manager_is_refused_and_recorded_on_no_unit() {
        for line in [
            "-M ctr restart postfix",
            "--machine=ctr restart postfix",
            "--host root@h restart postfix",
            "-qHh restart postfix",
            "-Mctr restart postfix",
        ] {
            match parse_call("systemctl", &args(line)) {
                Call::Refuse(records, _) => assert_eq!(
                    records,
                    [Record {
                        via: "systemctl".into(),
                        verb: "restart".into(),
                        unit: String::new()
                    }],
                    "{line}"
                ),
                other => panic!("{line}: {other:?}"),
            }
        }
        // A value that merely contains M or H is not a machine.
        assert!(matches!(
            parse_call("systemctl", &args("-pMainPID restart postfix")),
            Call::Record(ref r, 0) if r[0].unit == "postfix.service"
        ));
    }

    #[test]
    fn classification_follows_the_allow_list() {
        let allow = |u: &UnitName| u.as_str() == "postfix.service";
        let c = classify(
            &[
                rec("deb-systemd-invoke", "restart", "postfix.service"),
                rec("systemctl", "reload", "postfix.service"),
                rec("systemctl", "restart", "sshd.service"),
                rec("systemctl", "daemon-reload", ""),
                rec("systemctl", "enable", "sshd.service"),
                rec("systemctl", "start", "postfix.service"),
                rec("systemctl", "stop", "sshd.service"),
                rec("systemctl", "reboot", ""),
                rec("systemctl", "restart", "postfix.socket"),
                rec("systemctl", "isolate", "postfix.service"),
            ],
            &allow,
        );
        let d: Vec<&str> = c.captured.iter().map(|x| x.disposition.as_str()).collect();
        assert_eq!(
            d,
            [
                "performed",
                "performed",
                "denied",
                "ignored",
                "ignored",
                "ignored",
                "denied",
                "denied",
                "denied",
                "denied"
            ]
        );
        assert_eq!(c.plan.len(), 2);
        assert_eq!(c.plan[0].action, ServiceAction::TryRestart);
        assert_eq!(c.plan[1].action, ServiceAction::Reload);
        assert_eq!(
            c.denied().count(),
            5,
            "a system verb on an allowed unit too"
        );
    }
}
