//! `rollguard-controller`: create the fleet CA, enroll and revoke
//! certificates, and serve the controller. The command line lives in the
//! library (`rollguard_controller::server_cli`).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    rollguard_controller::server_cli::main()
}
