//! The cache `huggingface_hub` keeps, in its own layout, so a file fetched
//! by `huggingface-cli` (or transformers, llama.cpp's `-hf` does not share
//! it) is not fetched again by minnow, and the other way round:
//!
//! ```text
//! $HF_HUB_CACHE/                      (default $HF_HOME/hub, ~/.cache/huggingface/hub)
//!   models--USER--REPO/
//!     blobs/SHA256                    the file, named by its ETag (sha256 for LFS files)
//!     blobs/SHA256.incomplete         a download under way (resumed from its length)
//!     refs/main                       the commit a branch or tag pointed to when last asked
//!     snapshots/COMMIT/FILE           relative symlink to ../../blobs/SHA256
//!   .locks/models--USER--REPO/SHA256.lock
//! ```

use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

/// One repository's folder in the cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    /// `CACHE/models--USER--REPO`.
    pub dir: PathBuf,
    /// `CACHE/.locks/models--USER--REPO`.
    pub locks: PathBuf,
}

/// `models--USER--REPO`.
pub fn repo_folder(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// The repository `models--USER--REPO` names, if it is one.
pub fn repo_of_folder(folder: &str) -> Option<String> {
    let rest = folder.strip_prefix("models--")?;
    let (user, name) = rest.split_once("--")?;
    Some(format!("{user}/{name}"))
}

/// Is `s` a full commit hash (40 lowercase hex digits)?
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl RepoCache {
    pub fn new(cache: &Path, repo: &str) -> RepoCache {
        let folder = repo_folder(repo);
        RepoCache { dir: cache.join(&folder), locks: cache.join(".locks").join(folder) }
    }

    pub fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    pub fn snapshot(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// `snapshots/COMMIT/FILE` (FILE may have folders).
    pub fn pointer(&self, commit: &str, file: &str) -> PathBuf {
        let mut p = self.snapshot(commit);
        p.extend(file.split('/'));
        p
    }

    pub fn lock(&self, etag: &str) -> PathBuf {
        self.locks.join(format!("{etag}.lock"))
    }

    /// The commit `revision` stands for in the cache: itself when it is a
    /// commit hash, else what `refs/REVISION` says.
    pub fn commit_of(&self, revision: &str) -> Option<String> {
        if is_commit(revision) {
            return Some(revision.to_string());
        }
        let mut path = self.dir.join("refs");
        path.extend(revision.split('/'));
        let text = fs::read_to_string(path).ok()?;
        let commit = text.trim();
        is_commit(commit).then(|| commit.to_string())
    }

    /// Records that `revision` (a branch or tag) points at `commit`;
    /// atomically, so a reader sees the old or the new commit.
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let mut path = self.dir.join("refs");
        path.extend(revision.split('/'));
        if fs::read_to_string(&path).is_ok_and(|t| t.trim() == commit) {
            return Ok(());
        }
        let parent = path.parent().expect("refs/REVISION has a parent");
        fs::create_dir_all(parent).with_context(|| format!("could not create {}", parent.display()))?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        fs::write(&tmp, commit).with_context(|| format!("could not write {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("could not write {}", path.display()))
    }

    /// Points `snapshots/COMMIT/FILE` at `blobs/ETAG` with a relative
    /// symlink, as `huggingface_hub` does (so the cache can be moved).
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let pointer = self.pointer(commit, file);
        let parent = pointer.parent().expect("a pointer has a parent");
        fs::create_dir_all(parent).with_context(|| format!("could not create {}", parent.display()))?;
        // snapshots/COMMIT/a/b/FILE -> ../../../../blobs/ETAG
        let depth = 2 + file.matches('/').count();
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        let tmp = pointer.with_file_name(format!(".{}.tmp{}", etag, std::process::id()));
        let _ = fs::remove_file(&tmp);
        symlink(&target, &tmp).with_context(|| format!("could not create the link {}", tmp.display()))?;
        fs::rename(&tmp, &pointer).with_context(|| format!("could not create {}", pointer.display()))?;
        Ok(pointer)
    }

    /// Every file under `snapshots/COMMIT` that resolves to a readable file:
    /// (repository path, bytes).
    pub fn snapshot_files(&self, commit: &str) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        walk(&self.snapshot(commit), "", &mut out);
        out.sort();
        out
    }

    /// The commits this repository has snapshots of.
    pub fn commits(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.dir.join("snapshots"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        out.sort();
        out
    }

    /// The refs (branches, tags) that point at `commit`.
    pub fn refs_to(&self, commit: &str) -> Vec<String> {
        let mut files = Vec::new();
        walk(&self.dir.join("refs"), "", &mut files);
        files.into_iter().map(|(name, _)| name).filter(|name| self.commit_of(name).as_deref() == Some(commit)).collect()
    }
}

/// Adds every readable file under `dir` (symlinks followed) to `out` as
/// (path relative to the walk's root, size).
fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, u64)>) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else { continue };
        let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        match fs::metadata(entry.path()) {
            Ok(meta) if meta.is_dir() => walk(&entry.path(), &rel, out),
            Ok(meta) if meta.is_file() => out.push((rel, meta.len())),
            _ => {} // a dangling link: its blob was removed
        }
    }
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    // Without symlinks, huggingface_hub copies the blob; do the same.
    let blob = link.parent().unwrap_or(Path::new(".")).join(target);
    fs::copy(blob, link).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let dir = std::env::temp_dir().join(format!("minnow-hfcache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let repo = RepoCache::new(&dir, "u/r");
        assert_eq!(repo.dir, dir.join("models--u--r"));
        assert_eq!(repo.lock("abc"), dir.join(".locks/models--u--r/abc.lock"));
        assert_eq!(repo_of_folder("models--u--r").as_deref(), Some("u/r"));
        assert_eq!(repo_of_folder("datasets--u--r"), None);
        let commit = "0123456789abcdef0123456789abcdef01234567";
        assert!(is_commit(commit) && !is_commit("main"));
        assert_eq!(repo.commit_of("main"), None);
        repo.write_ref("main", commit).unwrap();
        assert_eq!(fs::read_to_string(dir.join("models--u--r/refs/main")).unwrap(), commit);
        assert_eq!(repo.commit_of("main").as_deref(), Some(commit));
        assert_eq!(repo.commit_of(commit).as_deref(), Some(commit));
        fs::create_dir_all(dir.join("models--u--r/blobs")).unwrap();
        fs::write(repo.blob("e1"), b"abc").unwrap();
        let p = repo.link(commit, "sub/m.gguf", "e1").unwrap();
        assert_eq!(fs::read_link(&p).unwrap(), PathBuf::from("../../../blobs/e1"));
        assert_eq!(fs::read(&p).unwrap(), b"abc");
        assert_eq!(repo.snapshot_files(commit), vec![("sub/m.gguf".to_string(), 3)]);
        assert_eq!(repo.commits(), vec![commit.to_string()]);
        assert_eq!(repo.refs_to(commit), vec!["main".to_string()]);
        fs::remove_file(repo.blob("e1")).unwrap();
        assert!(repo.snapshot_files(commit).is_empty(), "dangling links are not files");
        let _ = fs::remove_dir_all(&dir);
    }
}
