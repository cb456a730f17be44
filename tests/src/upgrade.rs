//! Another `pgquorum` binary than this build's, for rolling-upgrade tests: the last
//! release, kept as a fixture in tests/fixtures/upgrade-base (made by
//! `tests/fixtures/make-upgrade-base <commit>`), unpacked and checked against the
//! sha256 its description names.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A `pgquorum` binary other than this build's, started by [`crate::monitor_group`]
/// and [`crate::cluster`] in place of it.
#[derive(Clone, Debug)]
pub struct OtherBinary {
    pub path: PathBuf,
    /// Which version it is, for messages (the commit).
    pub label: String,
    /// Turns the arguments the testkit passes a process of `role` ("monitor" or
    /// "keeper") into ones this binary understands: a flag added to the testkit after
    /// this binary was built is dropped or rewritten here.
    pub args: fn(role: &str, args: &mut Vec<String>),
}

impl OtherBinary {
    /// The testkit's `args` for `role` (`monitor run` or `keeper run`), as this binary
    /// takes them. Panics, naming them, on flags it does not know after the edit: a flag
    /// the testkit gained since is found here, not as a process that exits at start.
    pub fn edit(&self, role: &str, args: &mut Vec<String>) {
        (self.args)(role, args);
        let known = known_flags(&self.path, &[role, "run"]);
        let unknown = unknown_flags(args, &known);
        assert!(
            unknown.is_empty(),
            "the testkit passes {unknown:?} to `{role} run`, which pgquorum {} does not \
             know: drop or rewrite them in the test's argument function",
            self.label
        );
    }
}

/// tests/fixtures/upgrade-base: the packed binary of the last release and what it is.
#[derive(Clone, Debug)]
pub struct Base {
    pub commit: String,
    pub rustc: String,
    /// Of the unpacked binary.
    pub sha256: String,
    pub packed: PathBuf,
}

/// The fixture directory in the source tree.
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/upgrade-base")
}

/// The fixture, if one is there: exactly one `pgquorum-<short commit>.txt` with
/// `commit:`, `rustc:` and `sha256:` lines beside its `pgquorum-<short commit>.xz`.
/// Panics on a fixture that is there but incomplete (a broken fixture must fail, not
/// skip).
pub fn base_fixture() -> Option<Base> {
    let dir = fixture_dir();
    let mut descs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "txt")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("pgquorum-"))
        })
        .collect();
    descs.sort();
    match descs.len() {
        0 => return None,
        1 => {}
        _ => panic!("more than one upgrade base in {}: {descs:?}", dir.display()),
    }
    let desc = &descs[0];
    let text = std::fs::read_to_string(desc).expect("read the fixture's description");
    let field = |name: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{} has no `{name}:` line", desc.display()))
    };
    let packed = desc.with_extension("xz");
    assert!(
        packed.exists(),
        "{} names a binary, but {} is missing",
        desc.display(),
        packed.display()
    );
    Some(Base {
        commit: field("commit"),
        rustc: field("rustc"),
        sha256: field("sha256"),
        packed,
    })
}

impl Base {
    /// Unpacks the binary to `dir/pgquorum-<commit>` (mode 755, so that keepers running
    /// as `postgres` can run it) and checks its sha256.
    pub fn unpack(&self, dir: &Path) -> PathBuf {
        let short: String = self.commit.chars().take(7).collect();
        let to = dir.join(format!("pgquorum-{short}"));
        let out = std::fs::File::create(&to).expect("create the unpacked binary");
        let st = Command::new("xz")
            .arg("-dc")
            .arg(&self.packed)
            .stdout(out)
            .status()
            .expect("run xz (Debian's xz-utils)");
        assert!(st.success(), "xz -dc {} failed", self.packed.display());
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the unpacked binary");
        let sum = Command::new("sha256sum")
            .arg(&to)
            .output()
            .expect("run sha256sum");
        let sum = String::from_utf8_lossy(&sum.stdout);
        let sum = sum.split_whitespace().next().unwrap_or_default();
        assert_eq!(
            sum,
            self.sha256,
            "the unpacked {} does not have the sha256 its description names",
            to.display()
        );
        to
    }
}

/// The long flags (`--name`) that `bin SUBCOMMAND... --help` lists.
pub fn known_flags(bin: &Path, sub: &[&str]) -> Vec<String> {
    let out = Command::new(bin)
        .args(sub)
        .arg("--help")
        .output()
        .expect("run pgquorum --help");
    String::from_utf8_lossy(&out.stdout)
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.split('=').next().unwrap_or(w).to_string())
        .collect()
}

/// The flags in `args` (`--x`) that `known` lacks.
pub fn unknown_flags(args: &[String], known: &[String]) -> Vec<String> {
    args.iter()
        .filter(|a| a.starts_with("--") && !known.contains(a))
        .cloned()
        .collect()
}
