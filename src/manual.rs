//! The manual page and the shell completions, generated from the command line's own clap
//! definition (`tidegate man`, `tidegate completions SHELL`), so that neither can drift from
//! what `--help` says.
//!
//! The manual is one page, `tidegate(1)`: the options of the server, then a section for every
//! command (`tidegate check`, `tidegate ctl drain`, …) with its usage, description, options
//! and examples, then what only a manual holds: the exit status, the environment, the signals
//! and where to read more.

use clap::Command;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};

/// The shells `tidegate completions` writes a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shell {
    /// bash (bash-completion)
    Bash,
    /// zsh
    Zsh,
    /// fish
    Fish,
}

/// The completion script of `cmd` for `shell`, for a program called `tidegate`.
pub fn completions(shell: Shell, mut cmd: Command) -> Vec<u8> {
    let generator = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    // Written to memory: the generators give up on a failed write by panicking, and a
    // closed pipe on standard output is the caller's to report.
    let mut out = Vec::new();
    clap_complete::generate(generator, &mut cmd, "tidegate", &mut out);
    out
}

/// What a manual says that the command line cannot: `.SH` sections after the commands.
const EXIT_STATUS: &[(&str, &str)] = &[
    (
        "0",
        "The server stopped normally (SIGTERM, SIGINT), or after a new tidegate took over; \
         check found the file valid; upgrade saw the new tidegate serve; ctl made the change.",
    ),
    (
        "1",
        "The server could not start (a listener could not bind, a certificate or the admin \
         token file could not be read, the control socket could not be set up, an upgrade \
         failed); upgrade could not reach the running tidegate or its successor did not start; \
         the admin API refused a ctl command.",
    ),
    (
        "2",
        "An invalid configuration file or command line, an unreadable file; ctl got no \
         answer it understands.",
    ),
];

const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "RUST_LOG",
        "The log level and targets, in tracing's EnvFilter syntax (default info; \
         RUST_LOG=info,tidegate::access=off turns the access log off). Logs go to standard error.",
    ),
    (
        "TIDEGATE_ADMIN_TOKEN",
        "The admin API's bearer token, when neither --admin-token-file nor the file's \
         admin_token_file gives one; and the token tidegate ctl sends without --token-file.",
    ),
    (
        "TIDEGATE_STORE_SECRET",
        "The shared store's secret, when [store] has no secret.",
    ),
    (
        "REDIS_PASSWORD",
        "The shared store's password, when its URL has none.",
    ),
];

const SIGNALS: &[(&str, &str)] = &[
    (
        "SIGHUP",
        "Re-read the configuration file and apply what changed (pools and backends; the rest \
         needs a restart or an upgrade), and reload the TLS certificates.",
    ),
    (
        "SIGTERM, SIGINT",
        "Stop accepting, let the requests in flight finish (shutdown_timeout), write the \
         state file, exit 0.",
    ),
];

const SEE_ALSO: &str = "The configuration reference (configuration.md), operations (operations.md: \
    the admin API, reloads, upgrades, images on demand, systemd), scaling.md, tls.md, \
    observability.md and security.md: in /usr/share/doc/tidegate when installed from the \
    package, in docs/ of the source. Check a configuration file with tidegate check --config FILE.";

/// The roff source of the manual page of `cmd` (the top-level command), its commands included.
pub fn man_page(cmd: Command) -> Vec<u8> {
    let version = cmd.get_version().unwrap_or_default().to_string();
    // Written by hand: clap_mangen leaves an empty date out of `.TH`, which shifts the
    // source and the manual into the date's place. No date: the page says its version.
    let mut page =
        format!(".TH TIDEGATE 1 \"\" \"tidegate {version}\" \"User Commands\"\n").into_bytes();
    let top = Man::new(cmd.clone());
    // Writing to a Vec cannot fail.
    let _ = top.render_name_section(&mut page);

    let commands = commands(&cmd);
    let mut roff = Roff::new();
    roff.control("SH", ["SYNOPSIS"]);
    synopsis(&mut roff, &cmd);
    for (_, sub) in &commands {
        roff.control("br", []);
        synopsis(&mut roff, sub);
    }
    let _ = roff.to_writer(&mut page);

    let _ = top.render_description_section(&mut page);
    let _ = top.render_options_section(&mut page);

    let mut roff = Roff::new();
    roff.control("SH", ["COMMANDS"]);
    let _ = roff.to_writer(&mut page);
    for (path, sub) in &commands {
        let mut roff = Roff::new();
        roff.control("SS", [path.as_str()]);
        synopsis(&mut roff, sub);
        roff.control("PP", []);
        let _ = roff.to_writer(&mut page);
        let man = Man::new(sub.clone());
        page.extend(without_headings(&man, Man::render_description_section));
        if sub.get_arguments().next().is_some() {
            page.extend(without_headings(&man, Man::render_options_section));
        }
        if let Some(after) = sub.get_after_help() {
            let mut roff = Roff::new();
            roff.control("PP", []);
            verbatim(&mut roff, &after.to_string());
            let _ = roff.to_writer(&mut page);
        }
    }

    let mut roff = Roff::new();
    if let Some(after) = cmd.get_after_help() {
        roff.control("SH", ["EXAMPLES"]);
        let text = after.to_string();
        verbatim(&mut roff, text.strip_prefix("Examples:\n").unwrap_or(&text));
    }
    for (heading, entries) in [
        ("EXIT STATUS", EXIT_STATUS),
        ("ENVIRONMENT", ENVIRONMENT),
        ("SIGNALS", SIGNALS),
    ] {
        roff.control("SH", [heading]);
        for (term, text) in entries {
            roff.control("TP", []);
            roff.text([bold(*term)]);
            roff.text([roman(*text)]);
        }
    }
    roff.control("SH", ["SEE ALSO"]);
    roff.text([roman(SEE_ALSO)]);
    roff.control("SH", ["VERSION"]);
    roff.text([roman(format!("tidegate {version}"))]);
    let _ = roff.to_writer(&mut page);
    once_preamble(&page)
}

/// The page with the lines every rendered piece starts with (defining `\*(Aq`) kept once,
/// at the top.
fn once_preamble(page: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(page);
    let preamble: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with(".ie \\n(.g .ds Aq") || l.starts_with(".el .ds Aq"))
        .take(2)
        .collect();
    let mut out = String::with_capacity(text.len());
    for line in preamble
        .iter()
        .copied()
        .chain(text.lines().filter(|l| !preamble.contains(l)))
    {
        out.push_str(line);
        out.push('\n');
    }
    out.into_bytes()
}

/// Every command under `cmd`, depth first, each named by its whole command line
/// (`tidegate ctl drain`) and set up to render as it is typed: help flags left out, they say
/// nothing a manual must.
fn commands(cmd: &Command) -> Vec<(String, Command)> {
    fn walk(cmd: &Command, path: &str, out: &mut Vec<(String, Command)>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let path = format!("{path} {}", sub.get_name());
            let mut sub = sub
                .clone()
                .bin_name(&path)
                .disable_help_flag(true)
                .disable_help_subcommand(true);
            sub.build();
            out.push((path.clone(), sub.clone()));
            walk(&sub, &path, out);
        }
    }
    let mut out = Vec::new();
    walk(cmd, cmd.get_name(), &mut out);
    out
}

/// The usage `--help` prints, a line for each form, with the command's name in bold.
fn synopsis(roff: &mut Roff, cmd: &Command) {
    let usage = cmd.clone().render_usage().to_string();
    let usage = usage.trim().trim_start_matches("Usage:");
    let name = cmd.get_bin_name().unwrap_or_else(|| cmd.get_name());
    for (i, form) in usage
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        if i > 0 {
            roff.control("br", []);
        }
        match form.strip_prefix(name) {
            Some(rest) => roff.text([bold(name), roman(rest)]),
            None => roff.text([roman(form)]),
        };
    }
}

/// Text kept line for line, as `--help` shows it (command-line examples).
fn verbatim(roff: &mut Roff, text: &str) {
    roff.control("nf", []);
    for line in text.trim_end().lines() {
        roff.text([roman(line)]);
    }
    roff.control("fi", []);
}

/// A section of clap_mangen's rendering without its `.SH` line: a command's part of the
/// page goes under the command's own `.SS` heading.
fn without_headings(
    man: &Man,
    render: fn(&Man, &mut dyn std::io::Write) -> std::io::Result<()>,
) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = render(man, &mut out);
    let text = String::from_utf8_lossy(&out);
    text.lines()
        .filter(|line| !line.starts_with(".SH "))
        .flat_map(|line| [line.as_bytes(), b"\n"].concat())
        .collect()
}
