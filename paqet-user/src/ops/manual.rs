//! `paqet manpage` and `paqet completions SHELL`: the man page and the shell completions,
//! generated from the clap definitions so they cannot drift from the flags.

use std::io::{self, Write};

use clap::CommandFactory;

use crate::cli::Cli;
use crate::config::keys::{KEYS, flag_for_key};

/// Writes paqet(1) in roff: clap_mangen's sections for the command and each subcommand,
/// then the config keys (from the flags that override them), files and exit codes.
pub fn write_manpage(out: &mut impl Write) -> io::Result<()> {
    let cmd = Cli::command();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    render_subcommands(out, &cmd)?;
    render_config_keys(out, &cmd)?;
    render_files_and_exit_codes(out)?;
    man.render_version_section(out)
}

fn render_subcommands(out: &mut impl Write, cmd: &clap::Command) -> io::Result<()> {
    writeln!(out, ".SH COMMANDS")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        writeln!(out, ".TP\n\\fBpaqet {}\\fR", sub.get_name())?;
        writeln!(
            out,
            "{}",
            roff_text(&sub.get_about().map(|a| a.to_string()).unwrap_or_default())
        )?;
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
            let Some(long) = arg.get_long() else { continue };
            let value = arg
                .get_value_names()
                .and_then(|v| v.first())
                .map_or(String::new(), |v| format!(" {v}"));
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            writeln!(
                out,
                ".RS\n.TP\n\\fB\\-\\-{}\\fR{}\n{}\n.RE",
                roff_text(long),
                roff_text(&value),
                roff_text(&help)
            )?;
        }
    }
    Ok(())
}

/// One entry per paqet.conf key, with the help of the flag that overrides it (each flag's
/// help starts with its key), so the table and the code share one list.
fn render_config_keys(out: &mut impl Write, cmd: &clap::Command) -> io::Result<()> {
    writeln!(out, ".SH CONFIGURATION")?;
    writeln!(
        out,
        "/etc/flowless/paqet.conf holds KEY=VALUE lines (# comments, optional quotes). A flag \
         overrides the key of the same name. The keys:"
    )?;
    let run = cmd.find_subcommand("run");
    for key in KEYS {
        let flag = flag_for_key(key);
        let help = run
            .and_then(|r| r.get_arguments().find(|a| a.get_long() == flag.strip_prefix("--")))
            .and_then(|a| a.get_help().map(|h| h.to_string()))
            .unwrap_or_default();
        let help = help.strip_prefix(&format!("{key}: ")).unwrap_or(&help).to_string();
        writeln!(
            out,
            ".TP\n\\fB{}\\fR ({})\n{}",
            roff_text(key),
            roff_text(&flag),
            roff_text(&help)
        )?;
    }
    Ok(())
}

fn render_files_and_exit_codes(out: &mut impl Write) -> io::Result<()> {
    let files = [
        (
            "/etc/flowless/paqet.conf",
            "the config; must not be readable by group or others (chmod 600)",
        ),
        ("/opt/flowless/bin/paqet", "the binary (/usr/bin/paqet links to it)"),
        (
            "/sys/fs/bpf/paqet/<role>-<interface>/",
            "the XDP program's pinned maps, for bpftool",
        ),
        (
            "/run/paqet/<instance>.json",
            "live sessions and counters, read by paqet status",
        ),
        ("/lib/systemd/system/paqet.service", "the systemd unit"),
    ];
    writeln!(out, ".SH FILES")?;
    for (path, what) in files {
        writeln!(out, ".TP\n\\fI{}\\fR\n{}", roff_text(path), roff_text(what))?;
    }
    writeln!(out, ".SH EXIT STATUS")?;
    writeln!(out, ".TP\n0\nsuccess, and after SIGTERM or SIGINT once streams drained")?;
    writeln!(
        out,
        ".TP\n1\nan error: bad config or flags, missing privileges, a failed check; the message names the cause"
    )?;
    writeln!(out, ".TP\n2\nthe command line could not be parsed")
}

/// Text safe in a roff line: backslashes and dashes escaped, no line starting with a dot.
fn roff_text(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with('.') || escaped.starts_with('\'') {
        format!("\\&{escaped}")
    } else {
        escaped
    }
}

/// Rendered in memory first: clap_complete panics on a failed write (`| head`).
pub fn write_completions(shell: clap_complete::Shell, out: &mut impl Write) -> std::io::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "paqet", &mut script);
    out.write_all(&script)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manpage_names_every_subcommand_config_key_and_exit_code() {
        let mut page = Vec::new();
        write_manpage(&mut page).unwrap();
        let page = String::from_utf8(page).unwrap();
        for sub in ["client", "server", "run", "check", "status", "genkey", "completions"] {
            assert!(page.contains(&format!("paqet {sub}")), "no {sub} in the page");
        }
        for key in KEYS {
            assert!(
                page.contains(&format!("\\fB{}\\fR (", roff_text(key))),
                "no {key} in the page"
            );
        }
        assert!(page.contains("\\-\\-socks\\-addr"));
        assert!(page.contains(".SH EXIT STATUS") && page.contains(".SH FILES"));
    }

    #[test]
    fn completions_cover_the_subcommands() {
        let mut script = Vec::new();
        write_completions(clap_complete::Shell::Bash, &mut script).unwrap();
        let script = String::from_utf8(script).unwrap();
        assert!(script.contains("complete -F _paqet") && script.contains("genkey"));
    }

    #[test]
    fn a_closed_output_is_an_error_not_a_panic() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let err = write_completions(clap_complete::Shell::Zsh, &mut Closed).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe);
    }
}
