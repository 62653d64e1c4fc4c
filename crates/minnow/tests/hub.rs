//! Models by their Hugging Face Hub name, end to end: the real `minnow`
//! binary against a Hub stand-in on loopback (`hub_standin`: the Hub's
//! API, headers, redirects to a CDN on another origin, `Range`), and the
//! official `huggingface_hub` client on the same cache.
//!
//! The stand-in holds SmolLM2 (the test model) as a single GGUF file, and
//! the same model split into three parts.

mod common;
mod hub_standin;

use common::{minnow_cmd, scratch_dir, smollm2};
use hub_standin::{Faults, HubFile, HubRepo, HubStandin};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const REPO: &str = "minnow-test/SmolLM2-135M-Instruct-GGUF";
const SPLIT_REPO: &str = "minnow-test/SmolLM2-135M-Split-GGUF";
const GATED_REPO: &str = "minnow-test/Gated-GGUF";
const PRIVATE_REPO: &str = "minnow-test/Private-GGUF";
const EMPTY_REPO: &str = "minnow-test/safetensors-only";
const FILE: &str = "SmolLM2-135M-Instruct-Q4_1.gguf";
const COMMIT: &str = "1111111111111111111111111111111111111111";
const SPLIT_COMMIT: &str = "2222222222222222222222222222222222222222";
const TOKEN: &str = "hf_standin_token";

/// The test model as a Hub file (hashed once per test binary).
fn model_file() -> &'static HubFile {
    static FILE_: OnceLock<HubFile> = OnceLock::new();
    FILE_.get_or_init(|| HubFile::lfs(FILE, &smollm2()))
}

/// The test model split into three parts by minnow's GGUF writer, in
/// llama.cpp's gguf-split layout (written once per test binary).
fn split_files() -> &'static Vec<HubFile> {
    static PARTS: OnceLock<Vec<HubFile>> = OnceLock::new();
    PARTS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("minnow-hub-split-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = minnow_gguf::GgufFile::open(smollm2()).unwrap();
        let n = file.tensors().len();
        let paths = minnow_gguf::GgufWriter::from_file(&file)
            .write_split(dir.join("SmolLM2-135M-Instruct-Q4_1"), n.div_ceil(3))
            .unwrap();
        assert_eq!(paths.len(), 3);
        paths.iter().map(|p| HubFile::lfs(&format!("Q4_1/{}", p.file_name().unwrap().to_str().unwrap()), p)).collect()
    })
}

/// A stand-in Hub with every test repository.
fn standin() -> HubStandin {
    let dir = std::env::temp_dir().join(format!("minnow-hub-inline-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let readme = HubFile::inline("README.md", &dir, "# SmolLM2 GGUF\n");
    let mmproj = HubFile { name: "mmproj-SmolLM2-f16.gguf".into(), ..HubFile::inline("mmproj", &dir, "not a model") };
    let main = HubRepo::new(REPO, COMMIT, vec![readme.clone(), model_file().clone(), mmproj]);
    let mut split_list = vec![readme.clone()];
    split_list.extend(split_files().iter().cloned());
    let split = HubRepo::new(SPLIT_REPO, SPLIT_COMMIT, split_list);
    let mut gated = HubRepo::new(GATED_REPO, COMMIT, vec![readme.clone(), model_file().clone()]);
    gated.gated_token = Some(TOKEN.into());
    let mut private = HubRepo::new(PRIVATE_REPO, COMMIT, vec![model_file().clone()]);
    private.private_token = Some(TOKEN.into());
    let empty = HubRepo::new(EMPTY_REPO, COMMIT, vec![readme, HubFile::inline("model.safetensors", &dir, "{}")]);
    HubStandin::start(vec![main, split, gated, private, empty])
}

/// `minnow ARGS` with the Hub at `endpoint` and its cache under `home`
/// (nothing from the environment leaks in: no token, no proxy).
fn minnow(home: &Path, endpoint: &str, args: &[&str]) -> Command {
    let mut cmd = minnow_cmd();
    cmd.args(args)
        .env("HF_HOME", home.join("hf-home"))
        .env("HF_HUB_CACHE", home.join("hub"))
        .env("HF_ENDPOINT", endpoint)
        .env("MINNOW_MODELS", home.join("minnow-models"))
        .env("NO_PROXY", "*");
    for var in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
        cmd.env_remove(var).env_remove(var.to_ascii_lowercase());
    }
    cmd
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("cannot run minnow");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "minnow failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The one line a failing command prints.
fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(!out.status.success(), "expected a failure; stdout: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Greedy text of a model, for comparing a pulled model with the local file.
fn greedy(home: &Path, endpoint: &str, model: &str) -> String {
    ok(&mut minnow(home, endpoint, &["run", model, "-p", "The capital of France is", "-n", "12", "--temp", "0"]))
}

fn sha256_of(path: &Path) -> String {
    HubFile::lfs("x", path).sha256
}

#[test]
fn pull_by_every_name_form_into_the_huggingface_cache() {
    let hub = standin();
    let home = scratch_dir("hub", "forms");
    let want = model_file();
    let out = ok(&mut minnow(&home, &hub.endpoint, &["pull", &format!("hf.co/{REPO}:Q4_1")]));
    let path = PathBuf::from(out.trim());
    let repo_dir = home.join("hub/models--minnow-test--SmolLM2-135M-Instruct-GGUF");
    assert_eq!(path, repo_dir.join("snapshots").join(COMMIT).join(FILE));
    // The huggingface_hub layout: a relative link to the blob named by its sha256, and the ref.
    assert_eq!(std::fs::read_link(&path).unwrap(), PathBuf::from(format!("../../blobs/{}", want.sha256)));
    assert_eq!(std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(), COMMIT);
    assert_eq!(sha256_of(&path), want.sha256);
    assert!(std::fs::read_dir(repo_dir.join("blobs")).unwrap().count() == 1, "only the GGUF file is fetched");
    // The file went through the CDN, without the token, in one piece.
    let gets = hub.cdn_gets();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(gets[0].sent, want.size);

    // Every other form names the same file, with no download.
    hub.clear_log();
    for name in [
        format!("hf.co/{REPO}"),
        format!("{REPO}:q4_1"),
        format!("huggingface.co/{REPO}:Q4_1"),
        format!("hf.co/{REPO}@main:Q4_1"),
        format!("hf.co/{REPO}:Q4_1@{COMMIT}"),
        format!("hf.co/{REPO}:{FILE}"),
    ] {
        let out = ok(&mut minnow(&home, &hub.endpoint, &["pull", &name]));
        assert_eq!(PathBuf::from(out.trim()), path, "{name}");
    }
    assert!(hub.cdn_gets().is_empty(), "cached files are not fetched again: {:?}", hub.cdn_gets());

    // Any command takes the name, and runs the same model as the local file.
    let by_name = greedy(&home, &hub.endpoint, &format!("{REPO}:Q4_1"));
    let by_path = greedy(&home, &hub.endpoint, smollm2().to_str().unwrap());
    assert_eq!(by_name, by_path);
    assert!(by_name.len() > 10, "{by_name}");

    // `minnow list` shows it; `minnow rm` removes it and its blob.
    let list = ok(&mut minnow(&home, &hub.endpoint, &["list"]));
    let line = list.lines().find(|l| l.contains(&format!("hf.co/{REPO}:Q4_1"))).unwrap_or_else(|| panic!("{list}"));
    assert!(line.contains("98 MB") && line.contains(path.to_str().unwrap()), "{line}");
    let bad = fails(&mut minnow(&home, &hub.endpoint, &["rm", &format!("hf.co/{REPO}:Q8_0")]));
    assert!(bad.contains("matches `Q8_0`"), "{bad}");
    let removed = ok(&mut minnow(&home, &hub.endpoint, &["rm", &format!("hf.co/{REPO}:Q4_1")]));
    assert!(removed.contains(FILE), "{removed}");
    assert!(!repo_dir.exists(), "nothing is left of a repository whose last model was removed");
    let list = ok(&mut minnow(&home, &hub.endpoint, &["list"]));
    assert!(!list.contains(REPO), "{list}");
}

#[test]
fn a_split_model_is_fetched_whole_and_loaded_as_one() {
    let hub = standin();
    let home = scratch_dir("hub", "split");
    let out = ok(&mut minnow(&home, &hub.endpoint, &["pull", &format!("hf.co/{SPLIT_REPO}")]));
    let first = PathBuf::from(out.trim());
    assert!(first.ends_with("Q4_1/SmolLM2-135M-Instruct-Q4_1-00001-of-00003.gguf"), "{}", first.display());
    assert_eq!(hub.cdn_gets().len(), 3, "every part is fetched");
    for part in split_files() {
        let name = part.name.rsplit('/').next().unwrap();
        assert_eq!(sha256_of(&first.with_file_name(name)), part.sha256);
    }
    let split = greedy(&home, &hub.endpoint, &format!("hf.co/{SPLIT_REPO}:Q4_1"));
    assert_eq!(split, greedy(&home, &hub.endpoint, smollm2().to_str().unwrap()));
    let list = ok(&mut minnow(&home, &hub.endpoint, &["list"]));
    assert!(list.lines().any(|l| l.contains(&format!("hf.co/{SPLIT_REPO}:Q4_1")) && l.contains("98 MB")), "{list}");
}

#[test]
fn a_dropped_download_resumes_where_it_stopped() {
    let hub = standin();
    let size = model_file().size;
    let half = size / 2;

    // Dropped once: the same pull goes on from where it got to.
    let home = scratch_dir("hub", "resume-once");
    hub.set_faults(Faults { drop_at: Some(half), drop_once: true, ..Faults::default() });
    let out = ok(&mut minnow(&home, &hub.endpoint, &["pull", &format!("hf.co/{REPO}")]));
    assert_eq!(sha256_of(Path::new(out.trim())), model_file().sha256);
    let gets = hub.cdn_gets();
    assert_eq!(gets.len(), 2, "{gets:?}");
    let resumed_at: u64 =
        gets[1].range.as_deref().and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok()).unwrap();
    assert!(resumed_at > 0 && resumed_at <= half, "resumed at {resumed_at}");
    assert_eq!(
        gets[0].sent + gets[1].sent - (half - resumed_at),
        size,
        "no byte fetched twice but what was lost in flight"
    );

    // Dropped every time: the pull gives up, keeps what it has, and the next one resumes.
    let home = scratch_dir("hub", "resume-later");
    hub.clear_log();
    hub.set_faults(Faults { drop_at: Some(half), drop_once: false, ..Faults::default() });
    let err = fails(&mut minnow(&home, &hub.endpoint, &["pull", &format!("hf.co/{REPO}")]));
    assert!(err.contains("run the command again to resume"), "{err}");
    let blobs = home.join("hub/models--minnow-test--SmolLM2-135M-Instruct-GGUF/blobs");
    let partial = blobs.join(format!("{}.incomplete", model_file().sha256));
    let kept = std::fs::metadata(&partial).unwrap().len();
    assert!(kept > 0 && kept <= half, "{kept}");
    assert!(!blobs.join(&model_file().sha256).exists());
    hub.set_faults(Faults::default());
    hub.clear_log();
    let out = ok(&mut minnow(&home, &hub.endpoint, &["pull", &format!("hf.co/{REPO}")]));
    assert_eq!(sha256_of(Path::new(out.trim())), model_file().sha256);
    let gets = hub.cdn_gets();
    assert_eq!(gets.len(), 1);
    assert_eq!(gets[0].range.as_deref(), Some(format!("bytes={kept}-").as_str()));
    assert_eq!(gets[0].sent, size - kept);
    assert!(!partial.exists());
}

#[test]
fn two_processes_pulling_one_file_download_it_once() {
    let hub = standin();
    let home = scratch_dir("hub", "concurrent");
    // Slow enough that the second process starts while the first downloads.
    hub.set_faults(Faults { throttle_bytes_per_s: 50_000_000, ..Faults::default() });
    let name = format!("hf.co/{REPO}:Q4_1");
    let children: Vec<_> = (0..2)
        .map(|_| {
            minnow(&home, &hub.endpoint, &["pull", &name])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for o in &outs {
        eprintln!("{}", String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success());
    }
    assert_eq!(outs[0].stdout, outs[1].stdout);
    assert_eq!(sha256_of(Path::new(String::from_utf8_lossy(&outs[0].stdout).trim())), model_file().sha256);
    assert_eq!(hub.cdn_gets().len(), 1, "one download: {:?}", hub.cdn_gets());
    assert!(outs.iter().any(|o| String::from_utf8_lossy(&o.stderr).contains("waiting for another process")));
}

/// A file put into the huggingface_hub layout by hand, as `huggingface-cli`
/// would leave it.
fn place_by_hand(hub_cache: &Path) -> PathBuf {
    let repo = hub_cache.join("models--minnow-test--SmolLM2-135M-Instruct-GGUF");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join(COMMIT)).unwrap();
    std::fs::copy(smollm2(), repo.join("blobs").join(&model_file().sha256)).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let pointer = repo.join("snapshots").join(COMMIT).join(FILE);
    std::os::unix::fs::symlink(format!("../../blobs/{}", model_file().sha256), &pointer).unwrap();
    pointer
}

#[test]
fn the_cache_is_used_without_downloading_online_offline_and_unreachable() {
    let hub = standin();
    let home = scratch_dir("hub", "cache");
    let pointer = place_by_hand(&home.join("hub"));
    let name = format!("hf.co/{REPO}:Q4_1");
    // Online: the Hub is asked which commit `main` is, nothing is downloaded.
    let out = ok(&mut minnow(&home, &hub.endpoint, &["pull", &name]));
    assert_eq!(PathBuf::from(out.trim()), pointer);
    assert!(hub.cdn_gets().is_empty(), "{:?}", hub.cdn_gets());
    assert!(hub.log().iter().any(|s| s.path.starts_with("/api/models/")));

    // Offline: the Hub is not asked at all (there is none at this endpoint).
    let dead = "http://127.0.0.1:9";
    let out = ok(minnow(&home, dead, &["pull", &name]).env("HF_HUB_OFFLINE", "1"));
    assert_eq!(PathBuf::from(out.trim()), pointer);
    let offline_run =
        ok(minnow(&home, dead, &["run", &name, "-p", "The capital of France is", "-n", "12", "--temp", "0"])
            .env("HF_HUB_OFFLINE", "1"));
    assert_eq!(offline_run, greedy(&home, dead, smollm2().to_str().unwrap()));
    let err = fails(minnow(&home, dead, &["pull", &format!("hf.co/{SPLIT_REPO}")]).env("HF_HUB_OFFLINE", "1"));
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains("not in the cache"), "{err}");
    let err = fails(minnow(&home, dead, &["pull", &format!("hf.co/{REPO}:Q8_0")]).env("HF_HUB_OFFLINE", "1"));
    assert!(err.contains("no GGUF file for `Q8_0`") && err.contains("Q4_1"), "{err}");

    // Online but the Hub unreachable: the cached copy, with a warning.
    let out = run(&mut minnow(&home, dead, &["pull", &name]));
    assert!(out.status.success());
    assert_eq!(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()), pointer);
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning"));
    let err = fails(&mut minnow(&home, dead, &["pull", &format!("hf.co/{SPLIT_REPO}")]));
    assert!(err.contains("could not reach") && err.contains("not in the cache"), "{err}");
}

#[test]
fn every_hub_error_is_one_clear_line() {
    let hub = standin();
    let home = scratch_dir("hub", "errors");
    let pull = |name: &str, token: Option<&str>| {
        let mut cmd = minnow(&home, &hub.endpoint, &["pull", name]);
        if let Some(t) = token {
            cmd.env("HF_TOKEN", t);
        }
        fails(&mut cmd)
    };
    let e = pull("hf.co/minnow-test/no-such-repo", None);
    assert!(e.contains("minnow-test/no-such-repo was not found") && e.contains("set HF_TOKEN"), "{e}");
    let e = pull("hf.co/minnow-test/no-such-repo", Some("hf_other"));
    assert!(e.contains("was not found") && e.contains("cannot read it"), "{e}");
    // A private repository is not found without its token...
    let e = pull(&format!("hf.co/{PRIVATE_REPO}"), None);
    assert!(e.contains("was not found") && e.contains("HF_TOKEN"), "{e}");
    // ...a gated one says so, with and without a token that lacks access.
    let e = pull(&format!("hf.co/{GATED_REPO}"), None);
    assert!(e.contains("is gated") && e.contains("set HF_TOKEN"), "{e}");
    let e = pull(&format!("hf.co/{GATED_REPO}"), Some("hf_other"));
    assert!(e.contains("is gated") && e.contains("cannot read it"), "{e}");
    assert!(hub.cdn_gets().is_empty());
    // With the token both work, and the token never reaches the CDN (it would refuse the request).
    hub.clear_log();
    for repo in [GATED_REPO, PRIVATE_REPO] {
        let mut cmd = minnow(&home, &hub.endpoint, &["pull", &format!("hf.co/{repo}")]);
        ok(cmd.env("HF_TOKEN", TOKEN));
    }
    let log = hub.log();
    assert!(log
        .iter()
        .filter(|s| s.server == "hub")
        .all(|s| s.authorization.as_deref() == Some(&format!("Bearer {TOKEN}"))));
    assert!(log.iter().filter(|s| s.server == "cdn").all(|s| s.authorization.is_none()));

    let e = pull(&format!("hf.co/{EMPTY_REPO}"), None);
    assert!(e.contains("has no GGUF file"), "{e}");
    let e = pull(&format!("hf.co/{REPO}:Q5_K_M"), None);
    assert!(e.contains("no GGUF file for `Q5_K_M`") && e.contains("it has: Q4_1"), "{e}");
    let e = pull(&format!("hf.co/{REPO}@v9"), None);
    assert!(e.contains("no such revision"), "{e}");
    let e = pull("hf.co/just-a-user", None);
    assert!(e.contains("not a Hub model name"), "{e}");

    // A corrupt download: named, removed, nothing left that a later run would trust.
    hub.set_faults(Faults { corrupt_at: Some(model_file().size / 3), ..Faults::default() });
    let e = pull(&format!("hf.co/{REPO}"), None);
    assert!(e.contains("is corrupt") && e.contains("the bad file was removed"), "{e}");
    let blobs = home.join("hub/models--minnow-test--SmolLM2-135M-Instruct-GGUF/blobs");
    assert_eq!(std::fs::read_dir(&blobs).map(|d| d.count()).unwrap_or(0), 0, "no blob and no .incomplete left");
    let e = fails(&mut minnow(&home, &hub.endpoint, &["run", &format!("hf.co/{REPO}"), "-p", "x", "-n", "1"]));
    assert!(e.contains("is corrupt"), "{e}");
    let e = fails(&mut minnow(&home, &hub.endpoint, &["rm", "hf.co/minnow-test/never-pulled"]));
    assert!(e.contains("not in the cache"), "{e}");
}

/// The official `huggingface_hub` client and minnow share one cache: a file
/// either one fetched is not fetched again by the other.
#[test]
fn huggingface_hub_and_minnow_share_the_cache() {
    let probe =
        Command::new("python3").args(["-c", "import huggingface_hub; print(huggingface_hub.__version__)"]).output();
    match probe {
        Ok(o) if o.status.success() => eprintln!("huggingface_hub {}", String::from_utf8_lossy(&o.stdout).trim()),
        _ => panic!("the `huggingface_hub` Python package is missing: run .ci/run, which installs it"),
    }
    let hub = standin();
    let home = scratch_dir("hub", "python");
    let python = |script: &str| {
        let mut cmd = Command::new("python3");
        cmd.args(["-c", script])
            .env("HF_HOME", home.join("hf-home"))
            .env("HF_HUB_CACHE", home.join("hub"))
            .env("HF_ENDPOINT", &hub.endpoint)
            .env("HF_HUB_DISABLE_TELEMETRY", "1")
            .env("NO_PROXY", "*")
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE");
        let out = cmd.output().unwrap();
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "python failed");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    // huggingface_hub downloads; minnow finds it.
    let py_path =
        python(&format!("from huggingface_hub import hf_hub_download; print(hf_hub_download('{REPO}', '{FILE}'))"));
    assert_eq!(hub.cdn_gets().len(), 1);
    hub.clear_log();
    let ours = ok(&mut minnow(&home, &hub.endpoint, &["pull", &format!("hf.co/{REPO}:Q4_1")]));
    assert_eq!(ours.trim(), py_path);
    assert!(hub.cdn_gets().is_empty(), "minnow fetched a file huggingface_hub had: {:?}", hub.cdn_gets());

    // minnow downloads (a split model); huggingface_hub finds every part, offline and online.
    ok(&mut minnow(&home, &hub.endpoint, &["pull", &format!("hf.co/{SPLIT_REPO}")]));
    hub.clear_log();
    for part in split_files() {
        let offline = python(&format!(
            "import os; os.environ['HF_HUB_OFFLINE'] = '1'\n\
             from huggingface_hub import hf_hub_download; print(hf_hub_download('{SPLIT_REPO}', '{}'))",
            part.name
        ));
        let online = python(&format!(
            "from huggingface_hub import hf_hub_download; print(hf_hub_download('{SPLIT_REPO}', '{}'))",
            part.name
        ));
        assert_eq!(offline, online);
        assert_eq!(sha256_of(Path::new(&online)), part.sha256);
    }
    assert!(hub.cdn_gets().is_empty(), "huggingface_hub fetched a file minnow had: {:?}", hub.cdn_gets());
    // And its cache scan sees minnow's files as a healthy cache.
    let report = python(&format!(
        "from huggingface_hub import scan_cache_dir\n\
         info = scan_cache_dir()\n\
         r = [r for r in info.repos if r.repo_id == '{SPLIT_REPO}'][0]\n\
         print(len(info.warnings), r.nb_files, r.size_on_disk, [rev.commit_hash for rev in r.revisions], sorted(r.refs))"
    ));
    let size: u64 = split_files().iter().map(|p| p.size).sum();
    assert_eq!(report, format!("0 3 {size} ['{SPLIT_COMMIT}'] ['main']"));
}
