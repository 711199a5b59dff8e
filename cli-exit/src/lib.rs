//! How `ca-server` and `node-identity` turn their command line into parsed flags or an
//! exit status: `--help` and `--version` print and succeed; any other problem is one
//! line on stderr, naming the program, and exit status 64 (`EX_USAGE`), before anything
//! starts or listens. Both log the same way ([`init_logging`]).
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::fmt::Display;
use std::process::ExitCode;

use clap::error::ErrorKind;

/// Exit status for a bad command line or configuration (`EX_USAGE` of sysexits.h).
pub const EXIT_USAGE: u8 = 64;

/// Prints `program: msg` and returns [`EXIT_USAGE`].
pub fn usage_error(program: &str, msg: impl Display) -> ExitCode {
    eprintln!("{program}: {msg}");
    ExitCode::from(EXIT_USAGE)
}

/// `--log-format`: how log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event.
    Json,
}

/// Logs to stderr in `format`, at the level `RUST_LOG` says (`info` without it).
pub fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Parses `argv` into `C`, or says why not and returns the status to exit with.
pub fn parse<C, I, T>(program: &str, argv: I) -> Result<C, ExitCode>
where
    C: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match C::try_parse_from(argv) {
        Ok(c) => Ok(c),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            Err(usage_error(program, format!("{first} (see --help)")))
        }
    }
}
