//! Operational logging (stderr) of both binaries, one convention:
//! - `EGRESS_LOG`: the filter, in `tracing-subscriber`'s `EnvFilter` syntax (`info` when unset:
//!   `debug`, `info,egress_gateway::denials=off`, ...);
//! - `EGRESS_LOG_FORMAT`: `text` or `json` (one JSON object per line, for log collectors);
//!   it overrides the format a binary's configuration asks for;
//! - colour only when stderr is a terminal, never into files or `kubectl logs`.
//!
//! The audit trail is something else: it has its own sinks and never goes through this.

#![forbid(unsafe_code)]

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The filter variable.
pub const FILTER_VAR: &str = "EGRESS_LOG";
/// The format variable.
pub const FORMAT_VAR: &str = "EGRESS_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            other => Err(format!("{FORMAT_VAR}={other:?}: expected text or json")),
        }
    }
}

/// Installs the global subscriber on stderr. The filter is `EGRESS_LOG`, else the first of
/// `aliases` that is set (older names a binary still honours), else `info`; the format is
/// `EGRESS_LOG_FORMAT`, else `format`. A bad format variable is reported and text is used.
pub fn init(format: Format, aliases: &[&str]) {
    let filter = std::iter::once(FILTER_VAR)
        .chain(aliases.iter().copied())
        .find_map(|v| EnvFilter::try_from_env(v).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (format, bad) = match std::env::var(FORMAT_VAR) {
        Ok(v) => match v.parse() {
            Ok(f) => (f, None),
            Err(e) => (Format::Text, Some(e)),
        },
        Err(_) => (format, None),
    };
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter);
    match format {
        Format::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        Format::Json => builder.json().with_current_span(false).init(),
    }
    if let Some(e) = bad {
        tracing::warn!("{e}; writing text");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_reject_others() {
        assert_eq!("json".parse::<Format>(), Ok(Format::Json));
        assert_eq!("text".parse::<Format>(), Ok(Format::Text));
        assert!("JSON".parse::<Format>().unwrap_err().contains("expected text or json"));
    }
}
