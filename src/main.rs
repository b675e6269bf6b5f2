//! The `outbox-relay` binary: everything lives in the library; see `cli`.

fn main() -> std::process::ExitCode {
    outbox_relay::cli::main()
}
