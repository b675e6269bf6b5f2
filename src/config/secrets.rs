//! Secrets: read from files (never from the TOML or the environment when a file is given),
//! checked for who else may read them, and redacted wherever settings are shown.

use super::*;

/// Substrings of property names whose values are secrets.
pub(super) const SECRET_PROPERTY_MARKERS: &[&str] = &[
    "password",
    "secret",
    "sasl.oauthbearer.config",
    "ssl.key",
    "sasl.jaas",
];

impl KafkaSettings {
    /// Whether the property's value is a secret: by its name, or because it was read
    /// from one of `secret_files`, whatever its name.
    pub(crate) fn is_secret(&self, name: &str) -> bool {
        is_secret_property(name) || self.secret_files.contains_key(name)
    }
}

impl Settings {
    /// Replaces `*_file` settings with the files' contents; a missing or unreadable file is
    /// a configuration error naming the key (never the content).
    /// Kafka's are left unread when the command `needs` only the database.
    pub(super) fn read_secret_files(&mut self, needs: Needs) -> Result<(), ConfigError> {
        if let Some(path) = &self.database.url_file {
            let url = read_secret_file("database.url_file", path)?;
            self.database.url = Secret(url);
        }
        if let Some(path) = &self.database.password_file {
            let password = read_secret_file("database.password_file", path)?;
            let mut url = url::Url::parse(self.database.url.expose()).map_err(|e| {
                ConfigError::new(
                    "database.url",
                    format!(
                        "is not a valid URL ({e}), so database.password_file cannot be applied"
                    ),
                )
            })?;
            url.set_password(Some(&password)).map_err(|()| {
                ConfigError::new(
                    "database.password_file",
                    "cannot be applied: database.url has no host",
                )
            })?;
            self.database.url = Secret(url.to_string());
        }
        if needs != Needs::Everything {
            return Ok(());
        }
        for (name, path) in &self.kafka.secret_files {
            let key = format!("kafka.secret_files.\"{name}\"");
            let value = read_secret_file(&key, path)?;
            if self.kafka.properties.contains_key(name) {
                return Err(ConfigError::new(
                    key,
                    format!("kafka.properties.\"{name}\" is set as well; keep one of the two"),
                ));
            }
            self.kafka
                .properties
                .insert(name.clone(), PropertyValue::Text(value));
        }
        Ok(())
    }

    /// Files the relay will open later (TLS material) must exist and be readable now, so a
    /// typo fails at start with the key named rather than at the first connection.
    pub(super) fn check_files(&self) -> Result<(), ConfigError> {
        for (name, value) in &self.kafka.properties {
            if name.ends_with(".location")
                && !(name == "ssl.ca.location" && value.to_string() == "probe")
            {
                let path = PathBuf::from(value.to_string());
                check_readable(&format!("kafka.properties.\"{name}\""), &path)?;
            }
        }
        if let Ok(url) = url::Url::parse(self.database.url.expose()) {
            for (param, value) in url.query_pairs() {
                // sqlx also takes the PEM itself in place of a path: nothing to open, and
                // nothing to quote in an error.
                if matches!(
                    param.as_ref(),
                    "sslrootcert"
                        | "ssl-root-cert"
                        | "ssl-ca"
                        | "sslcert"
                        | "ssl-cert"
                        | "sslkey"
                        | "ssl-key"
                ) && value != "system"
                    && !value.trim_start().starts_with("-----BEGIN")
                {
                    check_readable(
                        &format!("database.url ({param})"),
                        Path::new(value.as_ref()),
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// Resolves a relative secret path against systemd's `$CREDENTIALS_DIRECTORY`.
pub(super) fn credential_path(path: &Path) -> PathBuf {
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) if path.is_relative() => Path::new(&dir).join(path),
        _ => path.to_path_buf(),
    }
}

pub(super) fn read_secret_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    let path = credential_path(path);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        ConfigError::new(
            key,
            format!(
                "cannot read {} ({e}); check the path, the file's permissions, or the systemd credential / Kubernetes secret that should provide it",
                path.display()
            ),
        )
    })?;
    let value = text.trim_end_matches(['\n', '\r']).to_string();
    if value.is_empty() {
        return Err(ConfigError::new(
            key,
            format!("{} is empty", path.display()),
        ));
    }
    Ok(value)
}

/// Why a secret file is exposed to other users of the machine, if it is: readable by
/// everyone, or by a group the relay is not in (a group the relay is in, as Kubernetes'
/// `fsGroup` with `defaultMode: 0440`, is how it gets to read the file at all).
pub(super) fn secret_file_exposure(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let path = credential_path(path);
    let meta = std::fs::metadata(&path).ok()?;
    let mode = meta.mode() & 0o777;
    if mode & 0o004 != 0 {
        return Some(format!(
            "{} is readable by every user (mode {mode:o})",
            path.display()
        ));
    }
    if mode & 0o040 != 0 && !in_group(meta.gid()) {
        return Some(format!(
            "{} is readable by group {} (mode {mode:o}), which the relay is not in",
            path.display(),
            meta.gid()
        ));
    }
    None
}

/// Whether the process is in group `gid` (effective or supplementary).
pub(super) fn in_group(gid: u32) -> bool {
    // SAFETY: getegid cannot fail; getgroups writes at most `groups.len()` ids.
    unsafe {
        if libc::getegid() == gid {
            return true;
        }
        let mut groups = [0 as libc::gid_t; 256];
        let n = libc::getgroups(groups.len() as libc::c_int, groups.as_mut_ptr());
        n > 0 && groups[..n as usize].contains(&gid)
    }
}

pub(super) fn check_readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path).map(|_| ()).map_err(|e| {
        ConfigError::new(
            key,
            format!(
                "cannot read {} ({e}); point it at a readable file",
                path.display()
            ),
        )
    })
}

pub(crate) fn is_secret_property(name: &str) -> bool {
    SECRET_PROPERTY_MARKERS.iter().any(|m| name.contains(m))
}

/// `postgres://user:pw@host/db` → `postgres://user:[redacted]@host/db`.
pub(crate) fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("redacted"));
            }
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    // Passwords, and keys given inline as PEM.
                    if k.contains("password") || k.contains("key") {
                        (k.into_owned(), "redacted".to_string())
                    } else {
                        (k.into_owned(), v.into_owned())
                    }
                })
                .collect();
            if !pairs.is_empty() {
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        Err(_) => "[unparseable URL redacted]".into(),
    }
}
