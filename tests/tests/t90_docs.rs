//! The docs stay true to the binary: every `pgquorum …` command shown in README.md and
//! docs/getting-started.md (in code blocks and in inline code) is run through the real
//! binary's parser with `--help` appended: clap rejects an unknown subcommand, an
//! unknown flag or a bad value before it looks at `--help`, and prints the help (exit 0)
//! only when everything before it parsed. Placeholders (NAME, HOST:PORT, DIR, …) are
//! replaced by sample values; `a|b` alternatives are each checked.
//!
//! README's two main commands are checked by running them for real: `local up` by
//! t30_local_up, `./tests/run` by CI itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use pgquorum_testkit::pgquorum_bin;

fn repo_file(rel: &str) -> (PathBuf, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = root.join(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    (path, text)
}

/// Splits like a shell (quotes kept together, quotes removed).
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() || any {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (None, c) => cur.push(c),
        }
    }
    if !cur.is_empty() || any {
        out.push(cur);
    }
    out
}

/// True when `prefix` (what precedes the binary in its command) is only environment
/// assignments (`PGQUORUM_MONITOR=... pgquorum show state`).
fn only_env(prefix: &str) -> bool {
    prefix.split_whitespace().all(|w| {
        w.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
        })
    })
}

/// The `pgquorum` command lines in a piece of shell (one line, continuations joined,
/// comments cut): where `pgquorum` (or a path ending in `/pgquorum`) is the command
/// itself, not an argument of another (`kubectl -n pgquorum`, `install ... pgquorum`).
fn commands_in(line: &str) -> Vec<String> {
    let line = match line.find(" #") {
        Some(i) => &line[..i],
        None => line,
    };
    if line.trim_start().starts_with('#') {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(rel) = line[from..].find("pgquorum ") {
        let i = from + rel;
        from = i + "pgquorum ".len();
        // The whole word the name ends (./target/release/pgquorum).
        let word_start = line[..i]
            .rfind(|c: char| c.is_whitespace() || c == '(' || c == '"' || c == '`')
            .map_or(0, |j| j + 1);
        let word = &line[word_start..i];
        if !(word.is_empty() || word.ends_with('/')) {
            continue;
        }
        // What comes before it in its own command must be environment assignments.
        let before = &line[..word_start];
        let cmd_start = ["$(", ";", "&&", "| ", "`", "(", "\""]
            .iter()
            .filter_map(|sep| before.rfind(sep).map(|j| j + sep.len()))
            .max()
            .unwrap_or(0);
        if !only_env(&before[cmd_start..]) {
            continue;
        }
        let after = &line[from..];
        // Up to the end of this command: a pipe, `;`, `&&`, a redirection or the `)`
        // of a `$(...)`.
        let mut end = after.len();
        for stop in [" | ", ";", "&&", " > ", ")", "\"", "`"] {
            if let Some(j) = after.find(stop) {
                end = end.min(j);
            }
        }
        found.push(
            after[..end]
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    found
}

/// Sample values for the placeholders the docs use.
fn fill(word: &str) -> Option<String> {
    let w = word.trim_end_matches(['.', ',']);
    if w.is_empty() || w == "…" || w == "..." || w == "-" {
        return None;
    }
    let exact = match w {
        "HOST:PORT" | "HOST:PORT,HOST:PORT,HOST:PORT" | "HOST:PORT,..." => {
            Some("127.0.0.1:7000".to_owned())
        }
        "HOST" | "H" => Some("127.0.0.1".to_owned()),
        "PORT" => Some("5432".to_owned()),
        "N" => Some("1".to_owned()),
        "DIR" => Some("/tmp/pgquorum-docs".to_owned()),
        "FILE" => Some("/tmp/pgquorum-docs.conf".to_owned()),
        "NAME" | "NODE" => Some("node1".to_owned()),
        "SETTING" => Some("candidate-priority".to_owned()),
        "VALUE" => Some("0".to_owned()),
        _ => None,
    };
    Some(exact.unwrap_or_else(|| {
        w.replace("HOST:PORT", "127.0.0.1:7000")
            .replace("=N", "=1")
            .replace("…", "")
    }))
}

/// Every alternative of `a|b` words (`show state|events` → `show state`, `show events`).
fn expand(words: Vec<String>) -> Vec<Vec<String>> {
    match words.iter().position(|w| w.contains('|')) {
        None => vec![words],
        Some(i) => {
            let mut out = Vec::new();
            for alt in words[i].split('|') {
                let mut w = words.clone();
                w[i] = alt.to_owned();
                out.extend(expand(w));
            }
            out
        }
    }
}

/// Every `pgquorum` command in a markdown file: from fenced code blocks (line by line,
/// `\` continuations joined) and from inline code spans (which may wrap lines).
fn commands_of(md: &str) -> Vec<String> {
    let mut cmds = Vec::new();
    let mut prose = String::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            prose.push('\n');
            continue;
        }
        if in_block {
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            cmds.extend(commands_in(&std::mem::take(&mut pending)));
        } else {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    for (i, span) in prose.split('`').enumerate() {
        if i % 2 == 1 {
            let span = span.replace('\n', " ");
            cmds.extend(commands_in(&format!(" {span}")));
        }
    }
    cmds
}

#[test]
fn every_command_in_readme_and_getting_started_parses() {
    let bin = pgquorum_bin();
    let mut checked = 0;
    let mut failures = Vec::new();
    for file in ["README.md", "docs/getting-started.md"] {
        let (path, md) = repo_file(file);
        let cmds = commands_of(&md);
        assert!(
            cmds.len() >= 5,
            "found only {} commands in {}: {cmds:?}",
            cmds.len(),
            path.display()
        );
        for cmd in cmds {
            let mut w: Vec<String> = words(&cmd).iter().filter_map(|w| fill(w)).collect();
            // `cargo run -p pgquorum -- local up`: what follows `--` is pgquorum's.
            if w.first().map(String::as_str) == Some("--") {
                w.remove(0);
            }
            if w.is_empty() {
                continue;
            }
            for args in expand(w) {
                let out = std::process::Command::new(&bin)
                    .args(&args)
                    .arg("--help")
                    .env_remove("PGQUORUM_MONITOR")
                    .env_remove("PGQUORUM_CERTS_DIR")
                    .output()
                    .unwrap();
                checked += 1;
                if !out.status.success() {
                    failures.push(format!(
                        "{file}: `pgquorum {}` (from `{cmd}`):\n{}",
                        args.join(" "),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} documented commands do not parse:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_extraction_finds_commands_where_the_docs_put_them() {
    let md = "Run `pgquorum show state|events` now.\n\n```sh\nexport X=1\n\
              pgquorum perform switchover --candidate pg2   # comment\n\
              psql \"$(pgquorum show uri --role rw)\"\n\
              ./target/release/pgquorum show events | head -1\n\
              pgquorum keeper run --name a \\\n  --pgdata DIR\n```\n\
              and /etc/pgquorum/certs is a path.\n";
    let cmds = commands_of(md);
    assert_eq!(
        cmds,
        vec![
            "perform switchover --candidate pg2",
            "show uri --role rw",
            "show events",
            "keeper run --name a --pgdata DIR",
            "show state|events",
        ]
    );
    assert_eq!(
        expand(words("show state|events"))
            .into_iter()
            .map(|w| w.join(" "))
            .collect::<Vec<_>>(),
        vec!["show state", "show events"]
    );
}
