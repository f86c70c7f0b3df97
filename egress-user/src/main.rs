//! The `egress` binary: everything it does lives in the library (see `cli`).

fn main() -> std::process::ExitCode {
    egress_user::main()
}
