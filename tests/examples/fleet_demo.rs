//! The fleet half of `scripts/demo`: a controller and five agent daemons on
//! loopback (each with its own certificate, policy, state and host tree), a
//! signed bundle rolled out in waves, then the 2012 incident previewed on
//! every host (nothing changes; the real rollout after it is refused),
//! rolled out anyway and halted at the canary. Built on the same fleet harness as the end-to-end
//! tests, so what the demo shows is what the tests check.
//!
//! ```sh
//! sudo cargo run -p rollguard-tests --example fleet_demo
//! ```

use rollguard_tests::fleet::{manifest, script, Fleet};

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
    banner("A demo fleet: controller + 5 agents on loopback, each with its own mTLS certificate");
    let mut fleet = Fleet::new(&[
        ("mail-01", &[("role", "mail")]),
        ("mail-02", &[("role", "mail")]),
        ("mail-03", &[("role", "mail")]),
        ("mail-04", &[("role", "mail")]),
        ("web-01", &[("role", "web")]),
    ]);
    fleet.start_controller();
    fleet.start_agents();
    show(&fleet, &["agents"]);
    println!("(fleet files: {})", fleet.root().display());

    banner("A signed mail fix, planned and rolled out in waves 1, 2, 100% (canary first)");
    let good = fleet.bundle(
        "mail-fix",
        &manifest("mail-fix", 1, "\"mail-*\"", "1m"),
        &script("echo 'queue_lifetime = 2d' > \"$H/main.cf\"\necho \"fixed on $ROLLGUARD_HOST\""),
    );
    let good = good.to_str().unwrap();
    show(
        &fleet,
        &[
            "rollout", "plan", good, "--waves", "1,2,100%", "--bake", "1s",
        ],
    );
    let id = fleet.start_rollout(good.as_ref(), &["--waves", "1,2,100%", "--bake", "1s"]);
    fleet.wait_state(&id, "completed");
    show(&fleet, &["rollout", "status", &id]);

    banner("The 2012 incident: a mail fix with a stray delete of customer data and backups");
    let customers_before: Vec<_> = ["mail-01", "mail-02", "mail-03", "mail-04", "web-01"]
        .iter()
        .map(|h| {
            (
                Fleet::snapshot(&fleet.customers(h)),
                Fleet::snapshot(&fleet.backup(h)),
            )
        })
        .collect();
    let incident = fleet.bundle(
        "incident",
        &manifest("mail-fix-2012", 1, "\"mail-*\"", "1m"),
        &script(
            "touch \"$H/enabled\"\nrm -rf \"@FLEET@/customers/$ROLLGUARD_HOST\" \"@FLEET@/backup/$ROLLGUARD_HOST\"\necho done",
        ),
    );
    banner("Preview it on every target at once: the real script against an overlay of each host");
    let mail_before: Vec<_> = ["mail-01", "mail-02", "mail-03", "mail-04"]
        .iter()
        .map(|h| Fleet::snapshot(&fleet.mail(h)))
        .collect();
    let preview = fleet.start_rollout(&incident, &["--preview"]);
    fleet.wait_state(&preview, "completed");
    show(&fleet, &["rollout", "changes", &preview]);
    let mail_after: Vec<_> = ["mail-01", "mail-02", "mail-03", "mail-04"]
        .iter()
        .map(|h| Fleet::snapshot(&fleet.mail(h)))
        .collect();
    if mail_before != mail_after {
        eprintln!("ERROR: the preview changed a host");
        std::process::exit(1);
    }
    println!("nothing changed on any host; the real rollout after this preview is refused:");
    let incident_arg = incident.to_str().unwrap();
    show(
        &fleet,
        &[
            "rollout",
            "start",
            incident_arg,
            "--after-preview",
            &preview,
            "--waves",
            "1,100%",
        ],
    );

    banner("Rolled out without the preview's gate: the canary's denial halts it");
    let id = fleet.start_rollout(&incident, &["--waves", "1,100%", "--bake", "1s"]);
    fleet.wait_state(&id, "halted");
    show(&fleet, &["rollout", "status", &id]);

    let customers_after: Vec<_> = ["mail-01", "mail-02", "mail-03", "mail-04", "web-01"]
        .iter()
        .map(|h| {
            (
                Fleet::snapshot(&fleet.customers(h)),
                Fleet::snapshot(&fleet.backup(h)),
            )
        })
        .collect();
    banner("Afterwards");
    if customers_before == customers_after {
        println!("the canary's delete was denied by the kernel and reported; the rollout halted before wave 2;");
        println!("every customer and backup file on every host is byte-identical.");
    } else {
        eprintln!("ERROR: customer or backup data changed");
        std::process::exit(1);
    }
    // Dropping the fleet stops the controller and the agents.
    drop(fleet);
}
