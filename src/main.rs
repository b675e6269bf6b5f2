//! The `outbox-relay` binary: everything lives in the library; see `cli`.

// mimalloc: the relay allocates and frees a batch's rows and records every few
// milliseconds; glibc's malloc spent about 15 % of the relay's CPU on that (perf).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    outbox_relay::cli::main()
}
