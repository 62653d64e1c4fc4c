//! Models on the Hugging Face Hub, by name: `hf.co/USER/REPO[:QUANT][@REVISION]`.
//!
//! The Hub's own HTTP API, so a mirror or a private Hub works as well:
//! - `GET {endpoint}/api/models/{repo}/revision/{revision}?blobs=true`: the
//!   commit (`sha`) and every file (`siblings`: `rfilename`, `size`, and for
//!   LFS files `lfs.sha256`);
//! - `GET {endpoint}/{repo}/resolve/{commit}/{file}`: the file, usually by a
//!   redirect to a CDN. Redirects are followed by hand, and the token
//!   (`Authorization: Bearer $HF_TOKEN`) is only sent to the endpoint's own
//!   origin, never to the CDN.
//!
//! Files land in the cache `huggingface_hub` shares with the Python
//! ecosystem ([`cache`]); downloads resume, verify and lock (`download.rs`).
//! Environment: `HF_ENDPOINT` (default `https://huggingface.co`),
//! `HF_TOKEN` (else the file `$HF_HOME/token` that `huggingface-cli login`
//! writes), `HF_HUB_OFFLINE=1` (only the cache), `HF_HUB_CACHE` /
//! `HF_HOME` (where the cache is). When the Hub cannot be reached at all, a
//! cached copy of the revision is used, with a warning.

pub mod cache;
mod download;
pub mod name;

use anyhow::{anyhow, bail, Context, Result};
use cache::RepoCache;
pub use name::HubName;
use name::{choose, gguf_models, GgufModel};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the Hub is and how to talk to it.
pub struct Hub {
    /// Without a trailing `/`.
    pub endpoint: String,
    token: Option<String>,
    /// `HF_HUB_OFFLINE`: answer from the cache only.
    pub offline: bool,
    /// The `huggingface_hub` cache directory (`…/hub`).
    pub cache: PathBuf,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("offline", &self.offline)
            .field("cache", &self.cache)
            .finish()
    }
}

/// A file of a repository, as the API lists it.
#[derive(Debug, Clone)]
struct RemoteFile {
    name: String,
    size: u64,
    /// `lfs.sha256`: the blob's name in the cache and its checksum.
    sha256: Option<String>,
    /// The git blob id: the blob's name for a file kept outside LFS.
    blob_id: Option<String>,
}

impl Hub {
    /// The Hub as the environment describes it (see the module doc).
    pub fn from_env() -> Hub {
        Hub::from_env_with(|k| std::env::var_os(k))
    }

    fn from_env_with(env: impl Fn(&str) -> Option<OsString>) -> Hub {
        let set = |k: &str| env(k).filter(|v| !v.is_empty());
        let home = set("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        let xdg = set("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| home.join(".cache"));
        let hf_home = set("HF_HOME").map(PathBuf::from).unwrap_or_else(|| xdg.join("huggingface"));
        let cache = set("HF_HUB_CACHE")
            .or_else(|| set("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token_file = set("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| hf_home.join("token"));
        let token = set("HF_TOKEN")
            .or_else(|| set("HUGGING_FACE_HUB_TOKEN"))
            .and_then(|t| t.into_string().ok())
            .or_else(|| std::fs::read_to_string(token_file).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let truthy = |k: &str| {
            set(k)
                .and_then(|v| v.into_string().ok())
                .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "on" | "yes" | "true"))
        };
        let endpoint = set("HF_ENDPOINT")
            .and_then(|v| v.into_string().ok())
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        Hub { endpoint, token, offline: truthy("HF_HUB_OFFLINE"), cache, agent: agent() }
    }

    /// The local path of the model `name` picks (its first part, for a
    /// split model: the others sit beside it), downloading what is missing.
    pub fn resolve(&self, name: &HubName) -> Result<PathBuf> {
        let repo = RepoCache::new(&self.cache, &name.repo);
        if self.offline {
            return self.cached(&repo, name).map_err(|why| {
                anyhow!(
                    "HF_HUB_OFFLINE is set and {} is not in the cache ({why}); unset HF_HUB_OFFLINE to download it",
                    name.display()
                )
            });
        }
        let (commit, files) = match self.list_files(&name.repo, name.revision()) {
            Ok(listing) => listing,
            Err(ListError::Refused(e)) => return Err(e),
            Err(ListError::Unreachable(e)) => {
                return match self.cached(&repo, name) {
                    Ok(path) => {
                        eprintln!("minnow: warning: {e:#}; using the cached {}", name.display());
                        Ok(path)
                    }
                    Err(why) => Err(anyhow!("{e:#}, and {} is not in the cache ({why})", name.display())),
                };
            }
        };
        let listed: Vec<(String, u64)> = files.iter().map(|f| (f.name.clone(), f.size)).collect();
        let models = gguf_models(&listed);
        let model = choose(&models, name.quant.as_deref(), &name.repo)?;
        let mut first = None;
        for file in &model.files {
            let remote = files.iter().find(|f| &f.name == file).expect("chosen files are listed");
            let path = self.fetch_file(&repo, &name.repo, &commit, remote)?;
            first.get_or_insert(path);
        }
        repo.write_ref(name.revision(), &commit)?;
        Ok(first.expect("a model has a file"))
    }

    /// The model `name` picks among what the cache holds for its revision.
    fn cached(&self, repo: &RepoCache, name: &HubName) -> Result<PathBuf, String> {
        let Some(commit) = repo.commit_of(name.revision()) else {
            return Err(format!("no revision `{}` of {} under {}", name.revision(), name.repo, self.cache.display()));
        };
        let models = gguf_models(&repo.snapshot_files(&commit));
        let model: &GgufModel = choose(&models, name.quant.as_deref(), &name.repo).map_err(|e| format!("{e:#}"))?;
        Ok(repo.pointer(&commit, &model.files[0]))
    }

    /// The commit `revision` is at and the repository's files.
    fn list_files(&self, repo: &str, revision: &str) -> Result<(String, Vec<RemoteFile>), ListError> {
        let url = format!("{}/api/models/{repo}/revision/{}?blobs=true", self.endpoint, encode(revision, false));
        let response = self.get(&url, None, None).map_err(ListError::Unreachable)?;
        let status = response.status().as_u16();
        if status != 200 {
            if status == 429 || status >= 500 {
                return Err(ListError::Unreachable(anyhow!("{} answered {status} for {url}", self.endpoint)));
            }
            // The Hub answered no: a cached copy would hide that.
            return Err(ListError::Refused(self.status_error(&response, repo)));
        }
        let info: serde_json::Value = response
            .into_body()
            .with_config()
            .limit(64 << 20)
            .read_to_vec()
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
            .map_err(|e| ListError::Unreachable(anyhow!("{url} did not answer with the JSON the Hub sends: {e}")))?;
        let commit = info["sha"].as_str().filter(|s| cache::is_commit(s)).ok_or_else(|| {
            ListError::Unreachable(anyhow!(
                "{url} did not give the revision's commit (`sha`); is {} a Hugging Face Hub?",
                self.endpoint
            ))
        })?;
        let files = info["siblings"]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|f| {
                        let lfs = &f["lfs"];
                        Some(RemoteFile {
                            name: f["rfilename"].as_str()?.to_string(),
                            size: lfs["size"].as_u64().or(f["size"].as_u64()).unwrap_or(0),
                            sha256: lfs["sha256"].as_str().map(str::to_ascii_lowercase),
                            blob_id: f["blobId"].as_str().map(str::to_string),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok((commit.to_string(), files))
    }

    /// `snapshots/COMMIT/FILE`, its blob downloaded if the cache lacks it.
    fn fetch_file(&self, repo: &RepoCache, repo_id: &str, commit: &str, file: &RemoteFile) -> Result<PathBuf> {
        let pointer = repo.pointer(commit, &file.name);
        if pointer.is_file() {
            return Ok(pointer);
        }
        let etag = file.sha256.clone().or_else(|| file.blob_id.clone()).filter(|e| valid_etag(e)).ok_or_else(|| {
            anyhow!("{} lists {} without a checksum; cannot download it safely", self.endpoint, file.name)
        })?;
        if file.sha256.is_some() && file.size == 0 {
            bail!("{} lists {} without its size", self.endpoint, file.name);
        }
        let blob = repo.blob(&etag);
        if !blob.is_file() {
            let url = format!("{}/{repo_id}/resolve/{commit}/{}", self.endpoint, encode(&file.name, true));
            let want = download::Expected { file: file.name.clone(), size: file.size, sha256: file.sha256.clone() };
            download::fetch(self, &url, &want, &blob, &repo.lock(&etag))?;
        }
        repo.link(commit, &file.name, &etag)
    }

    /// A GET that follows redirects by hand, sending the token only to the
    /// endpoint's origin; `from` asks for the bytes from there on.
    fn get(
        &self,
        url: &str,
        from: Option<u64>,
        body_deadline: Option<Duration>,
    ) -> Result<ureq::http::Response<ureq::Body>> {
        let home = origin(&self.endpoint);
        let mut url = url.to_string();
        for _ in 0..10 {
            let mut req = self.agent.get(&url).header("Accept-Encoding", "identity");
            if let Some(from) = from.filter(|&f| f > 0) {
                req = req.header("Range", format!("bytes={from}-"));
            }
            if let Some(token) = self.token.as_ref().filter(|_| origin(&url) == home) {
                req = req.header("Authorization", format!("Bearer {token}"));
            }
            let req = req.config().timeout_recv_body(body_deadline).build();
            let response = req.call().map_err(|e| anyhow!("could not reach {}: {e}", origin(&url)))?;
            if response.status().is_redirection() {
                if let Some(location) = response.headers().get("location").and_then(|v| v.to_str().ok()) {
                    url = join(&url, location);
                    continue;
                }
            }
            return Ok(response);
        }
        bail!("{url}: more than 10 redirects")
    }

    /// One line saying what an error answer means and what to do.
    fn status_error(&self, response: &ureq::http::Response<ureq::Body>, what: &str) -> anyhow::Error {
        let status = response.status().as_u16();
        let code = response.headers().get("x-error-code").and_then(|v| v.to_str().ok()).unwrap_or("");
        let message = response.headers().get("x-error-message").and_then(|v| v.to_str().ok()).unwrap_or("");
        let token_hint = if self.token.is_some() {
            "the token in HF_TOKEN cannot read it"
        } else {
            "set HF_TOKEN to a token that can read it"
        };
        match (status, code) {
            (_, "GatedRepo") => anyhow!(
                "{what} is gated on {}: accept its conditions on the model's page, then {token_hint}",
                self.endpoint
            ),
            (_, "RevisionNotFound") => anyhow!("{what}: no such revision on {} ({message})", self.endpoint),
            (_, "RepoNotFound") | (404, "") => anyhow!(
                "repository {what} was not found on {} (check the name; if it is private, {token_hint})",
                self.endpoint
            ),
            (_, "EntryNotFound") => anyhow!("{what} is not in the repository on {}", self.endpoint),
            (401, _) => anyhow!("{what} on {} needs a token: {token_hint}", self.endpoint),
            (403, _) => anyhow!("{what} on {}: access refused; {token_hint}", self.endpoint),
            _ => anyhow!("{what}: {} answered {status} {message}", self.endpoint),
        }
    }
}

/// Why a repository's file list could not be had.
enum ListError {
    /// The Hub could not be asked (network, 5xx, not the Hub's JSON): the
    /// cache may stand in.
    Unreachable(anyhow::Error),
    /// The Hub answered no (not found, gated, no token).
    Refused(anyhow::Error),
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .max_redirects_will_error(false)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .user_agent(concat!("minnow/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

/// `scheme://host[:port]`, with the scheme's default port left out.
fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let host = rest.split(['/', '?', '#']).next().unwrap_or("").to_ascii_lowercase();
    let host = match scheme {
        "https" => host.strip_suffix(":443").unwrap_or(&host).to_string(),
        "http" => host.strip_suffix(":80").unwrap_or(&host).to_string(),
        _ => host,
    };
    format!("{scheme}://{host}")
}

/// `location` (absolute, `/path` or relative) as seen from `base`.
fn join(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if location.starts_with('/') {
        format!("{}{location}", origin(base))
    } else {
        let dir = base.split(['?', '#']).next().unwrap_or(base);
        let dir = &dir[..dir.rfind('/').map_or(dir.len(), |i| i + 1)];
        format!("{dir}{location}")
    }
}

/// Percent-encodes a URL path segment (keeping `/` when `keep_slash`).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A blob name must be a plain file name (hex, from the Hub).
fn valid_etag(etag: &str) -> bool {
    !etag.is_empty() && etag.len() <= 128 && etag.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One cached Hub model, for `minnow list`.
#[derive(Debug, Clone)]
pub struct CachedHubModel {
    pub name: HubName,
    pub size: u64,
    /// Every part, in order.
    pub paths: Vec<PathBuf>,
    /// The commit, and the branches or tags pointing at it.
    pub commit: String,
    pub refs: Vec<String>,
}

/// Every GGUF model in the `huggingface_hub` cache at `cache`.
pub fn cached_models(cache: &Path) -> Vec<CachedHubModel> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(cache) else { return out };
    let mut folders: Vec<String> = entries.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
    folders.sort();
    for folder in folders {
        let Some(repo_id) = cache::repo_of_folder(&folder) else { continue };
        let repo = RepoCache::new(cache, &repo_id);
        for commit in repo.commits() {
            let refs = repo.refs_to(&commit);
            for model in gguf_models(&repo.snapshot_files(&commit)) {
                let quant = model.quant.clone().or_else(|| Some(model.files[0].clone()));
                out.push(CachedHubModel {
                    name: HubName { repo: repo_id.clone(), quant, revision: None },
                    size: model.size,
                    paths: model.files.iter().map(|f| repo.pointer(&commit, f)).collect(),
                    commit: commit.clone(),
                    refs: refs.clone(),
                });
            }
        }
    }
    out
}

/// Removes `name` from the cache at `cache`: with a QUANT, that model's
/// files (in every snapshot, or the one `@REVISION` names) and the blobs no
/// other file links to; without, the whole repository. Returns what it
/// removed, as `minnow rm` reports it.
pub fn remove_cached(cache: &Path, name: &HubName) -> Result<Vec<String>> {
    let repo = RepoCache::new(cache, &name.repo);
    if !repo.dir.is_dir() {
        bail!("{} is not in the cache ({}); `minnow list` shows what is", name.display(), cache.display());
    }
    let Some(quant) = &name.quant else {
        std::fs::remove_dir_all(&repo.dir).with_context(|| format!("could not remove {}", repo.dir.display()))?;
        let _ = std::fs::remove_dir_all(&repo.locks);
        return Ok(vec![repo.dir.display().to_string()]);
    };
    let commits = match &name.revision {
        Some(rev) => repo.commit_of(rev).into_iter().collect(),
        None => repo.commits(),
    };
    let mut removed = Vec::new();
    for commit in &commits {
        let models = gguf_models(&repo.snapshot_files(commit));
        let Ok(model) = choose(&models, Some(quant), &name.repo) else { continue };
        for file in &model.files {
            let pointer = repo.pointer(commit, file);
            std::fs::remove_file(&pointer).with_context(|| format!("could not remove {}", pointer.display()))?;
            removed.push(pointer.display().to_string());
        }
    }
    if removed.is_empty() {
        bail!("no cached file of {} matches `{quant}`; `minnow list` shows what is cached", name.repo);
    }
    // Blobs no snapshot links to any more.
    let mut linked = std::collections::HashSet::new();
    for commit in repo.commits() {
        collect_links(&repo.snapshot(&commit), &mut linked);
    }
    for entry in std::fs::read_dir(repo.dir.join("blobs")).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".incomplete") && !linked.contains(&name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    // Empty snapshot folders, and a repository with nothing left.
    for commit in repo.commits() {
        remove_empty_dirs(&repo.snapshot(&commit));
    }
    if repo.commits().is_empty() {
        let _ = std::fs::remove_dir_all(&repo.dir);
        let _ = std::fs::remove_dir_all(&repo.locks);
    }
    Ok(removed)
}

/// The blob names the links under `dir` point at.
fn collect_links(dir: &Path, out: &mut std::collections::HashSet<String>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match std::fs::read_link(&path) {
            Ok(target) => {
                if let Some(n) = target.file_name() {
                    out.insert(n.to_string_lossy().into_owned());
                }
            }
            Err(_) if path.is_dir() => collect_links(&path, out),
            Err(_) => {}
        }
    }
}

/// Removes `dir` and the folders under it that hold nothing.
fn remove_empty_dirs(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_empty_dirs(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir); // fails unless empty
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(origin("https://huggingface.co/api/x"), "https://huggingface.co");
        assert_eq!(origin("https://HF.co:443/x"), "https://hf.co");
        assert_eq!(origin("http://127.0.0.1:8080/x?y"), "http://127.0.0.1:8080");
        assert_eq!(join("http://a:1/u/r/resolve/c/f", "/cdn/x?sig=1"), "http://a:1/cdn/x?sig=1");
        assert_eq!(join("http://a:1/u/r/f", "https://cdn/x"), "https://cdn/x");
        assert_eq!(join("http://a:1/u/r/f?q", "g"), "http://a:1/u/r/g");
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("Q4 K/m.gguf", true), "Q4%20K/m.gguf");
        assert!(valid_etag("abc123") && !valid_etag("../x") && !valid_etag(""));
    }

    #[test]
    fn environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            Hub::from_env_with(move |k| vars.iter().find(|(key, _)| *key == k).map(|(_, v)| OsString::from(v)))
        };
        let hub = env(&[("HOME", "/h")]);
        assert_eq!(hub.endpoint, "https://huggingface.co");
        assert_eq!(hub.cache, PathBuf::from("/h/.cache/huggingface/hub"));
        assert!(!hub.offline && hub.token.is_none());
        let hub = env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]);
        assert_eq!(hub.cache, PathBuf::from("/x/huggingface/hub"));
        let hub = env(&[("HF_HOME", "/hf"), ("HF_ENDPOINT", "http://127.0.0.1:9/"), ("HF_HUB_OFFLINE", "1")]);
        assert_eq!(
            (hub.cache.as_path(), hub.endpoint.as_str(), hub.offline),
            (Path::new("/hf/hub"), "http://127.0.0.1:9", true)
        );
        let hub = env(&[("HF_HUB_CACHE", "/c"), ("HF_HOME", "/hf"), ("HF_TOKEN", "hf_x"), ("HF_HUB_OFFLINE", "0")]);
        assert_eq!((hub.cache.as_path(), hub.token.as_deref(), hub.offline), (Path::new("/c"), Some("hf_x"), false));
        assert!(!format!("{hub:?}").contains("hf_x"), "the token is never printed");
    }
}
