//! The patch half of `scripts/demo`: a small package upgraded from v1 to v2
//! on a real host, and its service restarted, through a signed rollout.
//!
//! The host is a container running systemd 252 (Debian 12), so the demo
//! installs nothing on the machine it runs on: our own `rollguard-agent`
//! .deb goes into it with `dpkg -i`, its systemd starts the agent from our
//! unit as shipped, and the agent connects to a controller on this machine.
//! Built on the same harness as the end-to-end test
//! (tests/tests/fleet_host.rs), so what the demo shows is what the test
//! checks.
//!
//! ```sh
//! sudo cargo run -p rollguard-tests --example patch_demo
//! ```
//!
//! Needs systemd-container, mmdebstrap and cargo-deb (scripts/install-deps);
//! the container's Debian root is built once (about 15 s, from Debian's
//! archive) and cached under `target/`.

use rollguard_tests::fleet::Fleet;
use rollguard_tests::fleet_host::{self, FleetHost, FleetHostPolicy, PatchPackages, PATCH_SERVICE};

const HOST: &str = "mail-01.patch";

fn banner(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

/// Run an operator command and show it with its output.
fn show(fleet: &Fleet, args: &[&str]) {
    println!("$ rollguard {}", args.join(" "));
    let out = fleet.cli().args(args).output().expect("rollguard");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
}

fn main() {
    banner(
        "A fleet host: systemd 252 in a container, our rollguard-agent .deb installed with dpkg -i",
    );
    let deb = fleet_host::agent_deb();
    let mut fleet = Fleet::new(&[]);
    fleet.start_controller();
    let host = FleetHost::install(HOST, &deb);
    println!(
        "installed {}",
        deb.file_name().unwrap_or_default().to_string_lossy()
    );

    banner("The host runs rgpkgtest 1.0 (a conffile, a service, a postinst that restarts it)");
    let patch = PatchPackages::build(&fleet.root().join("patch-debs"));
    let pid = fleet_host::install_patch_v1(&host, &patch.v1);
    println!("{PATCH_SERVICE} running, MainPID {pid}");

    banner("Its policy allows that service, and systemd starts the agent from our unit");
    let mut policy = FleetHostPolicy::default();
    fleet_host::allow_patch(&mut policy);
    host.configure(&fleet, &policy);
    host.start_agent(&fleet);
    println!(
        "{}",
        host.ct
            .sh("systemctl show -p ActiveState -p MainPID rollguard-agent.service")
            .trim_end()
    );
    show(&fleet, &["agents"]);

    banner(
        "A signed patch bundle: [packages] install rgpkgtest 2.0, [services] restart its service",
    );
    let outcome =
        fleet_host::patch_rolls_out(&fleet, &host, &patch, &mut |line| println!("  {line}"));
    println!(
        "\nthe scope the install needed was derived from the package at build and signed;\n\
         dpkg and the postinst ran confined; the postinst's restart was captured, not performed,\n\
         and the agent restarted the allowed unit itself through systemd's D-Bus API."
    );
    println!(
        "\nIn a container the kernel's audit cannot be read, so the report says denials are\n\
         unknown (never zero), and the controller halted on that until the operator resumed."
    );
    show(&fleet, &["rollout", "status", &outcome.rollout]);
    println!(
        "\nrgpkgtest {} -> {}, {PATCH_SERVICE} MainPID {} -> {}",
        outcome.version_before.as_deref().unwrap_or("-"),
        outcome.version_after.as_deref().unwrap_or("-"),
        outcome.main_pid_before,
        outcome.main_pid_after
    );
    println!("(the container and the controller are removed on exit)");
}
