//! Golden files: bytes of a persisted format written by one version of pgquorum, kept
//! in the repository forever, that every later version must still read.
//!
//! Layout: `<crate>/tests/golden/<label>/<file>`, one directory per format generation
//! (`<label>` names the version that wrote it, e.g. `2026-11-30`). A test reads every
//! file of every label with the current code. Nothing ever rewrites a file: blessing
//! (`PGQUORUM_BLESS=<label> cargo test -p CRATE --test golden`) writes a NEW label
//! directory and refuses one that exists, so the bytes of older versions stay pinned.
//! See docs/operations.md, "Rolling upgrades".

use std::path::{Path, PathBuf};

/// The environment variable that asks a golden test to write a new generation.
pub const BLESS_VAR: &str = "PGQUORUM_BLESS";

/// Every label directory under `root`, in name order, with its files in name order.
pub fn generations(root: &Path) -> Vec<(String, Vec<PathBuf>)> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(root) else {
        return out;
    };
    let mut dirs: Vec<PathBuf> = dirs
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for d in dirs {
        let label = d
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&d)
            .map(|it| it.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        out.push((label, files));
    }
    out
}

/// Writes `files` (name, bytes) as the new generation `PGQUORUM_BLESS` names, under
/// `root`; does nothing when the variable is not set. Panics (the test fails) when
/// that generation exists already: old goldens are never overwritten.
pub fn bless(root: &Path, files: &[(String, Vec<u8>)]) {
    let Ok(label) = std::env::var(BLESS_VAR) else {
        return;
    };
    assert!(
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)),
        "{BLESS_VAR}={label:?}: use letters, digits, '-', '_' and '.' (e.g. the date)"
    );
    let dir = root.join(&label);
    assert!(
        !dir.exists(),
        "{} exists: goldens are never overwritten; bless under a new label",
        dir.display()
    );
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for (name, bytes) in files {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    eprintln!("golden: wrote {} files to {}", files.len(), dir.display());
}

/// Whether `new` keeps everything `old` says: every key of every object of `old` is in
/// `new` with an equal value (recursively), arrays element by element. `new` may have
/// more keys (fields added since, with their defaults). A field renamed, dropped or
/// read into something else shows up here even when serde's defaults let it decode.
pub fn keeps(old: &serde_json::Value, new: &serde_json::Value) -> Result<(), String> {
    fn walk(path: &str, old: &serde_json::Value, new: &serde_json::Value) -> Result<(), String> {
        use serde_json::Value::*;
        match (old, new) {
            (Object(o), Object(n)) => {
                for (k, v) in o {
                    let p = format!("{path}.{k}");
                    match n.get(k) {
                        Some(nv) => walk(&p, v, nv)?,
                        // An absent optional field reads as None: nothing was lost.
                        None if v.is_null() => {}
                        None => return Err(format!("{p} is lost on re-encoding")),
                    }
                }
                Ok(())
            }
            (Array(o), Array(n)) => {
                if o.len() != n.len() {
                    return Err(format!("{path}: {} elements became {}", o.len(), n.len()));
                }
                for (i, (a, b)) in o.iter().zip(n).enumerate() {
                    walk(&format!("{path}[{i}]"), a, b)?;
                }
                Ok(())
            }
            (a, b) if a == b => Ok(()),
            (a, b) => Err(format!("{path}: {a} became {b}")),
        }
    }
    walk("$", old, new)
}
