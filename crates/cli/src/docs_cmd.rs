//! `pgquorum completions SHELL` and `pgquorum man --out DIR`: shell completion and man
//! pages generated from the same clap definitions that parse the command line, so they
//! cannot drift from it.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::Cli;

pub fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "pgquorum", &mut buf);
    print!("{}", String::from_utf8_lossy(&buf));
    Ok(())
}

/// One page per command and subcommand: pgquorum.1, pgquorum-show.1,
/// pgquorum-show-state.1, ... (as git names its pages).
pub fn man(out: &Path, json: bool) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, "pgquorum", out, &mut written)?;
    if json {
        println!("{}", serde_json::json!({ "written": written }));
    } else {
        for w in &written {
            println!("{w}");
        }
    }
    Ok(())
}

fn write_pages(
    cmd: &clap::Command,
    name: &str,
    out: &Path,
    written: &mut Vec<String>,
) -> Result<()> {
    if cmd.is_hide_set() {
        return Ok(());
    }
    // After `build()`, clap names each subcommand's page `pgquorum-show-state` and its
    // synopsis `pgquorum show state`.
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut buf)
        .with_context(|| format!("cannot render the page of {name}"))?;
    let path = out.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
    written.push(path.display().to_string());
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        write_pages(sub, &format!("{name}-{}", sub.get_name()), out, written)?;
    }
    Ok(())
}
