//! `rollguard-sandbox-exec PLAN.json`: stage 2 of a confined run
//! (`rollguard_agent::sandbox::stage2`), started by `rollguard-agent` for
//! every run, never by hand.
//!
//! A program of its own rather than a sub-command of `rollguard-agent`
//! because it is exec'd once per run: the agent binary carries the daemon's
//! TLS, HTTP/2 and async runtime (11 MB, ~27,000 relocations to apply and
//! ~200 page faults per exec), this one only the confinement code.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    // Nothing before this: stage 2 must start single-threaded and untouched
    // by logging or argument-parsing setup.
    //
    // Called through a link named `systemctl`, `deb-systemd-invoke`,
    // `invoke-rc.d`, `service` or `policy-rc.d` (the sandbox puts those
    // first on the bundle's PATH): record the service request, never
    // perform it (`rollguard_agent::services::capture`).
    if let Some(shim) = std::env::args_os()
        .next()
        .and_then(|a| rollguard_agent::services::capture::shim_name(&a))
    {
        return rollguard_agent::services::capture::shim_main(shim, std::env::args_os());
    }
    rollguard_agent::sandbox::stage2_command(std::env::args_os())
}
