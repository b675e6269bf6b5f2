//! What this binary is: its version, the git revision it was built from and the librdkafka
//! it carries, said the same way by `--version` and `outbox_relay_build_info`.

/// The crate's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// `git rev-parse --short=12 HEAD` at build time (`-modified` with uncommitted changes),
/// or `unknown` outside a checkout.
pub const GIT_REVISION: &str = env!("OUTBOX_RELAY_GIT_REVISION");

/// The bundled librdkafka's version, as the library reports it.
pub fn librdkafka_version() -> String {
    rdkafka::util::get_rdkafka_version().1
}

/// `0.1.0 (git 1a2b3c4d5e6f, librdkafka 2.12.1)`.
pub fn version_line() -> String {
    format!(
        "{VERSION} (git {GIT_REVISION}, librdkafka {})",
        librdkafka_version()
    )
}
