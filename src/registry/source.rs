//! Model sources: a local file under a model directory, or an `http://` URL.

use std::path::{Component, Path, PathBuf};

use super::error::RegistryError;
use super::http::HttpUrl;

/// Where a model file comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A file under one of the configured model directories (checked by [`resolve_local`]).
    Local(PathBuf),
    /// A file fetched over HTTP into the download cache.
    Http(HttpUrl),
}

impl Source {
    /// `http://` and `https://` are URLs, any other `scheme://` is an error, and everything
    /// else is a local path.
    pub fn parse(text: &str) -> Result<Source, RegistryError> {
        let t = text.trim();
        if t.is_empty() {
            return Err(RegistryError::BadSource { given: text.to_owned(), reason: "the source is empty".into() });
        }
        match t.split_once("://") {
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") => {
                HttpUrl::parse(t).map(Source::Http)
            }
            Some((scheme, _)) => Err(RegistryError::BadSource {
                given: t.to_owned(),
                reason: format!("unsupported scheme `{scheme}` (use http://, https:// or a local path)"),
            }),
            None => Ok(Source::Local(PathBuf::from(t))),
        }
    }

    /// The source as written back (URL or path).
    pub fn describe(&self) -> String {
        match self {
            Source::Local(p) => p.display().to_string(),
            Source::Http(u) => u.as_str().to_owned(),
        }
    }
}

/// Largest pipeline file a load may name (64 KiB): it is read whole.
pub const MAX_PIPELINE_BYTES: u64 = 64 << 10;

/// The real path of a model file under `registry.model_dirs` (`dirs`); see [`resolve_under`].
pub fn resolve_local(path: &Path, dirs: &[PathBuf]) -> Result<PathBuf, RegistryError> {
    resolve_under(path, dirs, "registry.model_dirs")
}

/// The real path of a pipeline file named by a load: a regular file under
/// `registry.pipeline_dirs` (`dirs`, the same rules as model paths) of at most
/// [`MAX_PIPELINE_BYTES`], checked before anything reads it.
pub fn resolve_pipeline(path: &Path, dirs: &[PathBuf]) -> Result<PathBuf, RegistryError> {
    let real = resolve_under(path, dirs, "registry.pipeline_dirs")?;
    let size = std::fs::metadata(&real).map_err(RegistryError::io(&real))?.len();
    if size > MAX_PIPELINE_BYTES {
        return Err(RegistryError::FileTooLarge { path: real, size, cap: MAX_PIPELINE_BYTES });
    }
    Ok(real)
}

/// The real path of `path` if it names an existing regular file under one of `dirs` (the
/// directories config key `key` lists, named in errors): a relative path is taken relative
/// to each directory in turn. `..` components are refused, and symlinks are followed before
/// the check, so a link pointing out of the directories is refused too.
pub fn resolve_under(path: &Path, dirs: &[PathBuf], key: &'static str) -> Result<PathBuf, RegistryError> {
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(RegistryError::ParentComponent { path: path.to_owned(), key });
    }
    let roots: Vec<PathBuf> = dirs.iter().filter_map(|d| d.canonicalize().ok()).collect();
    let candidates: Vec<PathBuf> =
        if path.is_absolute() { vec![path.to_owned()] } else { dirs.iter().map(|d| d.join(path)).collect() };
    let mut missing = None;
    for candidate in candidates {
        match candidate.canonicalize() {
            Ok(real) if roots.iter().any(|r| real.starts_with(r)) => {
                return match real.is_file() {
                    true => Ok(real),
                    false => Err(RegistryError::NotAFile { path: real }),
                };
            }
            Ok(_) => {
                return Err(RegistryError::OutsideDirs {
                    path: path.to_owned(),
                    key,
                    dirs: dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
                });
            }
            Err(error) => missing = missing.or(Some(RegistryError::Io { path: candidate, error })),
        }
    }
    Err(missing.unwrap_or_else(|| RegistryError::BadSource {
        given: path.display().to_string(),
        reason: format!("no directory is configured (`{key}`)"),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_of_source() {
        assert!(matches!(Source::parse("http://127.0.0.1:8/m.gguf"), Ok(Source::Http(_))));
        assert!(matches!(Source::parse("models/m.gguf"), Ok(Source::Local(p)) if p == Path::new("models/m.gguf")));
        assert!(matches!(Source::parse("https://x/m.gguf"), Ok(Source::Http(_))));
        let e = Source::parse("ftp://x/m.gguf").unwrap_err().to_string();
        assert!(e.contains("unsupported scheme `ftp`"), "{e}");
        assert!(Source::parse("  ").is_err());
    }
}
