//! The manual pages: clap_mangen's page for each command, and for the main page the
//! sections an operator looks for in man(1) that clap cannot know (exit status,
//! environment, files, where the rest of the documentation is).

use std::io::Write;
use std::path::Path;

use clap_mangen::roff::{Roff, bold, italic, roman};

/// Writes the main page to `out`.
pub(super) fn write_main_page(command: clap::Command, out: &mut dyn Write) -> std::io::Result<()> {
    let page = clap_mangen::Man::new(command);
    page.render_title(out)?;
    page.render_name_section(out)?;
    page.render_synopsis_section(out)?;
    page.render_description_section(out)?;
    page.render_options_section(out)?;
    page.render_subcommands_section(out)?;
    operator_sections().to_writer(out)?;
    page.render_version_section(out)
}

/// Writes every page into `dir`: one per command (clap_mangen's) and the main page.
pub(super) fn write_all_pages(command: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(command.clone(), dir)?;
    let mut main = std::fs::File::create(dir.join("outbox-relay.1"))?;
    write_main_page(command, &mut main)?;
    main.flush()
}

fn operator_sections() -> Roff {
    let mut roff = Roff::default();
    let entry = |roff: &mut Roff, term: &str, text: &str| {
        roff.control("TP", []);
        roff.text([bold(term)]);
        roff.text([roman(text)]);
    };
    roff.control("SH", ["EXIT STATUS"]);
    entry(
        &mut roff,
        "0",
        "Done. For where --verify and verify: every record checked is where the outbox says.",
    );
    entry(
        &mut roff,
        "1",
        "A runtime failure: a database or broker that does not answer, another pruner at work, a republish interrupted or refused; or a record missing, different or unverifiable (where --verify, verify).",
    );
    entry(
        &mut roff,
        "2",
        "A configuration or arguments the relay refuses, named in the message; nothing was changed. Also: ids given to parked replay or parked discard that are not parked, a bulk parked discard or prune without --yes, republish to the original topics without --yes. systemd does not restart the relay after exit 2.",
    );
    roff.control("SH", ["ENVIRONMENT"]);
    entry(
        &mut roff,
        "OUTBOX_RELAY_CONFIG",
        "The configuration file, when --config is not given.",
    );
    roff.control("TP", []);
    roff.text([
        bold("OUTBOX_RELAY_"),
        italic("SECTION"),
        bold("__"),
        italic("KEY"),
    ]);
    roff.text([roman("Overrides a key of the file, e.g. OUTBOX_RELAY_DATABASE__URL, OUTBOX_RELAY_KAFKA__PROPERTIES__SASL_USERNAME. Variables without the double underscore are ignored with a warning (Kubernetes service links); a misspelt key exits 2.")]);
    entry(
        &mut roff,
        "RUST_LOG",
        "A tracing filter; wins over log.level.",
    );
    entry(
        &mut roff,
        "PGPASSWORD",
        "Used by PostgreSQL's rules when database.url holds no password and database.password_file is not set, before ~/.pgpass.",
    );
    roff.control("SH", ["FILES"]);
    entry(
        &mut roff,
        "/etc/outbox-relay/outbox-relay.toml",
        "The configuration of a host install, read when neither --config, OUTBOX_RELAY_CONFIG nor ./config/outbox-relay.toml names or holds one. outbox-relay config-schema prints its JSON Schema.",
    );
    entry(
        &mut roff,
        "/usr/lib/systemd/system/outbox-relay.service",
        "The hardened unit; it reads /etc/outbox-relay/outbox-relay.env and the credentials in /etc/outbox-relay/credentials/.",
    );
    entry(
        &mut roff,
        "/usr/share/doc/outbox-relay/",
        "The README, the operations guide, the configuration reference, the runbook of every alert, and the least-privilege SQL script under examples/.",
    );
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman("Each command has its own page: outbox-relay-run(1), outbox-relay-status(1), outbox-relay-parked(1) and the others listed under SUBCOMMANDS.")]);
    roff
}
