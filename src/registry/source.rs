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

/// The real path of `path` if it names an existing file under one of `dirs`: a relative
/// path is taken relative to each directory in turn. `..` components are refused, and
/// symlinks are followed before the check, so a link pointing out of the directories is
/// refused too.
pub fn resolve_local(path: &Path, dirs: &[PathBuf]) -> Result<PathBuf, RegistryError> {
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(RegistryError::ParentComponent { path: path.to_owned() });
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
                    false => {
                        Err(RegistryError::BadSource { given: path.display().to_string(), reason: "not a file".into() })
                    }
                };
            }
            Ok(_) => {
                return Err(RegistryError::OutsideModelDirs {
                    path: path.to_owned(),
                    dirs: dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
                });
            }
            Err(error) => missing = missing.or(Some(RegistryError::Io { path: candidate, error })),
        }
    }
    Err(missing.unwrap_or_else(|| RegistryError::BadSource {
        given: path.display().to_string(),
        reason: "no model directory is configured (`registry.model_dirs`)".into(),
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
