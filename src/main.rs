//! The `outbox-relay` binary: everything lives in the library; see `cli`.

// mimalloc: the relay allocates and frees a batch's rows and records every few
// milliseconds; glibc's malloc spent about 15 % of the relay's CPU on that (perf). With
// the `override` feature it also serves librdkafka's C allocations (a copy of every
// message), where glibc's bins cost another 6 % of the relay's instructions (callgrind);
// `no_thp` keeps it off transparent huge pages, whose 2 MiB first touches were zeroed on
// the relay's time and held about 20 MiB more resident.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    outbox_relay::cli::main()
}
