//! Split models (llama.cpp's `gguf-split` layout): a model written as parts
//! by `GgufWriter::write_split` opens from any part as the one model it was,
//! every way the parts can fail to belong together is refused with an error
//! naming the files, and a single file still opens as it always did.
//!
//! With `MINNOW_LLAMA_GGUF_SPLIT` naming llama.cpp's `llama-gguf-split`
//! binary, the SmolLM2 test also splits the model with it and checks that
//! its parts read the same (and says how they differ from ours, byte-wise).

use minnow_gguf::{GgmlType, GgufError, GgufFile, GgufWriter, Value, ValueType};
use std::path::{Path, PathBuf};

/// A fresh directory for one test, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("minnow-gguf-split-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A small model: some metadata and `n` F32 tensors `t0`, `t1`, … of
/// different sizes and contents.
fn small_model(n: usize) -> GgufWriter<'static> {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", Value::String("test".into())).unwrap();
    w.add_metadata("test.count", Value::U32(7)).unwrap();
    let tokens = vec![Value::String("a".into()), Value::String("bc".into())];
    w.add_metadata("tokenizer.ggml.tokens", Value::Array(ValueType::String, tokens)).unwrap();
    for i in 0..n {
        let values: Vec<f32> = (0..=i).map(|j| (i * 100 + j) as f32).collect();
        w.add_tensor(format!("t{i}"), &[values.len() as u64], GgmlType::F32, f32_bytes(&values)).unwrap();
    }
    w
}

/// One hand-made part: the given split keys (`None` leaves one out), extra
/// metadata, and F32 tensors of one element each named `tensors`.
fn part(split: [Option<Value>; 3], extra: &[(&str, Value)], tensors: &[&str]) -> GgufWriter<'static> {
    let mut w = GgufWriter::new();
    for (key, value) in extra {
        w.add_metadata(*key, value.clone()).unwrap();
    }
    for (key, value) in ["split.no", "split.count", "split.tensors.count"].into_iter().zip(split) {
        if let Some(value) = value {
            w.add_metadata(key, value).unwrap();
        }
    }
    for (i, name) in tensors.iter().enumerate() {
        w.add_tensor(*name, &[1], GgmlType::F32, f32_bytes(&[i as f32])).unwrap();
    }
    w
}

/// The keys of a well-formed part `no` (0-based) of `count`, `total` tensors.
fn keys(no: u16, count: u16, total: i32) -> [Option<Value>; 3] {
    [Some(Value::U16(no)), Some(Value::U16(count)), Some(Value::I32(total))]
}

fn arch() -> Vec<(&'static str, Value)> {
    vec![("general.architecture", Value::String("test".into()))]
}

/// Opens `path`, requires an error whose one-line message contains every
/// needle, and returns the message.
#[track_caller]
fn expect_err(path: &Path, needles: &[&str]) -> String {
    match GgufFile::open(path) {
        Ok(_) => panic!("{}: opened; expected an error mentioning {needles:?}", path.display()),
        Err(e) => {
            let message = e.to_string();
            for needle in needles {
                assert!(message.contains(needle), "error {message:?} does not mention {needle:?}");
            }
            assert!(!message.contains('\n'), "error is not one line: {message:?}");
            message
        }
    }
}

/// `split` reads as the same model as `single`: metadata, tensor list (all
/// but the part-relative offsets) and every tensor's bytes.
fn assert_same_model(split: &GgufFile, single: &GgufFile) {
    assert_eq!(split.metadata(), single.metadata());
    assert_eq!(split.version(), single.version());
    assert_eq!(split.tensors().len(), single.tensors().len());
    for (s, o) in split.tensors().iter().zip(single.tensors()) {
        assert_eq!((&s.name, &s.dims, s.ty, s.n_bytes), (&o.name, &o.dims, o.ty, o.n_bytes));
        assert_eq!(split.tensor(&o.name), Some(s));
        assert!(split.tensor_data(s) == single.tensor_data(o), "{}: data differs", o.name);
        assert!(split.tensor_data_by_name(&o.name) == Some(single.tensor_data(o)), "{}", o.name);
    }
}

/// Every part's own layout: its tensors lie inside it, aligned.
fn assert_parts_consistent(split: &GgufFile) {
    for t in split.tensors() {
        let part = split.tensor_part(&t.name).unwrap();
        let size = std::fs::metadata(&split.part_paths()[part]).unwrap().len();
        let start = split.part_data_offset(part).unwrap() + t.offset;
        assert!(start + t.n_bytes <= size, "{}", t.name);
        assert_eq!(start % split.alignment(), 0, "{}", t.name);
    }
}

fn file_sizes(paths: &[PathBuf]) -> u64 {
    paths.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum()
}

#[test]
fn smollm2_split_reads_like_the_single_file() {
    let path = minnow_models::test_model("smollm2-135m-instruct-q4_1.gguf");
    let single = GgufFile::open(&path).unwrap();
    let n = single.tensors().len();
    let dir = TempDir::new("smollm2");
    let prefix = dir.join("smollm2");
    let per_part = 100;
    let paths = GgufWriter::from_file(&single).write_split(&prefix, per_part).unwrap();
    assert_eq!(paths.len(), n.div_ceil(per_part));
    assert!(paths.len() >= 3, "{n} tensors make only {} parts", paths.len());
    for (k, p) in paths.iter().enumerate() {
        let name = format!("smollm2-{:05}-of-{:05}.gguf", k + 1, paths.len());
        assert_eq!(p, &dir.join(&name));
    }

    for opened in [&paths[0], &paths[1], &paths[paths.len() - 1]] {
        let split = GgufFile::open(opened).unwrap_or_else(|e| panic!("{}: {e}", opened.display()));
        assert_same_model(&split, &single);
        assert_parts_consistent(&split);
        assert_eq!(split.part_paths(), &paths[..]);
        assert_eq!(split.file_size(), file_sizes(&paths));
        assert_eq!(split.alignment(), single.alignment());
        assert_eq!(split.data_offset(), split.part_data_offset(0).unwrap());
        assert!(split.get("split.count").is_none() && split.get("split.no").is_none());
        let last = &single.tensors()[n - 1].name;
        let first = &single.tensors()[0].name;
        assert_eq!((split.tensor_part(first), split.tensor_part(last)), (Some(0), Some(paths.len() - 1)));
        assert!(format!("{split:?}").ends_with(&format!("n_parts: {} }}", paths.len())));
        // Pages of any part can be dropped and read again.
        let data = split.tensor_data_by_name(last).unwrap();
        let copy = data.to_vec();
        split.release_pages(data);
        assert!(split.tensor_data_by_name(last).unwrap() == copy);
    }

    let merged = dir.join("merged.gguf");
    let split = GgufFile::open(&paths[1]).unwrap();
    GgufWriter::from_file(&split).write_file(&merged).unwrap();
    drop(split);
    // Joining the parts again gives the original file, byte for byte.
    let same = std::fs::read(&merged).unwrap() == std::fs::read(&path).unwrap();
    assert!(same, "the parts joined again differ from the original file");
    std::fs::remove_file(&merged).unwrap();

    if let Some(tool) = std::env::var_os("MINNOW_LLAMA_GGUF_SPLIT") {
        check_llama_gguf_split(Path::new(&tool), &path, &single, &paths, per_part, &dir);
    } else {
        eprintln!("skipping the llama.cpp comparison: set MINNOW_LLAMA_GGUF_SPLIT to llama-gguf-split's path");
    }
}

/// Splits the model with llama.cpp's tool into the same number of tensors
/// per part: its parts must read as the model too. Byte-identity with ours
/// is not required; how they differ is printed.
fn check_llama_gguf_split(
    tool: &Path,
    model: &Path,
    single: &GgufFile,
    ours: &[PathBuf],
    per_part: usize,
    dir: &TempDir,
) {
    let prefix = dir.join("llama");
    let status = std::process::Command::new(tool)
        .args(["--split", "--split-max-tensors", &per_part.to_string()])
        .arg(model)
        .arg(&prefix)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()));
    assert!(status.success(), "{} failed: {status}", tool.display());
    let theirs: Vec<PathBuf> =
        (1..=ours.len()).map(|k| dir.join(format!("llama-{k:05}-of-{:05}.gguf", ours.len()))).collect();
    for opened in &theirs {
        let split = GgufFile::open(opened).unwrap_or_else(|e| panic!("{}: {e}", opened.display()));
        assert_same_model(&split, single);
        assert_parts_consistent(&split);
        assert_eq!(split.part_paths(), &theirs[..]);
        assert_eq!(split.file_size(), file_sizes(&theirs));
    }
    for (a, b) in ours.iter().zip(&theirs) {
        let (a_bytes, b_bytes) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        match a_bytes.iter().zip(&b_bytes).position(|(x, y)| x != y) {
            None if a_bytes.len() == b_bytes.len() => eprintln!("{}: byte-identical to llama.cpp's", a.display()),
            first => eprintln!(
                "{}: {} bytes, llama.cpp's {} bytes; first difference at {:?}",
                a.display(),
                a_bytes.len(),
                b_bytes.len(),
                first
            ),
        }
    }
}

#[test]
fn small_split_every_part_opens_as_the_model() {
    let dir = TempDir::new("small");
    let w = small_model(7);
    let paths = w.write_split(dir.join("m"), 3).unwrap();
    assert_eq!(paths.len(), 3);
    let single = GgufFile::from_bytes(w.to_bytes()).unwrap();
    for p in &paths {
        let split = GgufFile::open(p).unwrap();
        assert_same_model(&split, &single);
        assert_parts_consistent(&split);
        assert_eq!(split.part_paths(), &paths[..]);
        assert_eq!(split.file_size(), file_sizes(&paths));
        let parts: Vec<_> = split.tensors().iter().map(|t| split.tensor_part(&t.name).unwrap()).collect();
        assert_eq!(parts, [0, 0, 0, 1, 1, 1, 2]);
        assert_eq!(split.part_data_offset(3), None);
    }
    // A relative path works as well as an absolute one. (The only test here
    // that changes the working directory; the others use absolute paths.)
    let cwd = std::env::current_dir().unwrap();
    std::env::set_current_dir(&dir.0).unwrap();
    let relative = GgufFile::open("m-00002-of-00003.gguf");
    std::env::set_current_dir(cwd).unwrap();
    let relative = relative.unwrap();
    assert_eq!(relative.part_paths()[0], Path::new("m-00001-of-00003.gguf"));
    assert_same_model(&relative, &single);
}

/// The bytes of each part: what a writer holding just that part's metadata
/// and tensors writes. The first part has the model's metadata, then the
/// split keys (replacing any the model had); later parts the split keys and
/// `general.alignment`, so their data is aligned as the model asks.
#[test]
fn part_layout() {
    let dir = TempDir::new("layout");
    let mut w = small_model(4);
    w.add_metadata("general.alignment", Value::U32(64)).unwrap();
    // As if copied from a one-part split: replaced, not duplicated.
    w.add_metadata("split.count", Value::U16(1)).unwrap();
    let paths = w.write_split(dir.join("a"), 3).unwrap();
    assert_eq!(paths.len(), 2);

    let mut first = small_model(0);
    first.add_metadata("general.alignment", Value::U32(64)).unwrap();
    let mut second = GgufWriter::new();
    // In llama.cpp's order.
    let split_keys =
        |no| [("split.no", Value::U16(no)), ("split.tensors.count", Value::I32(4)), ("split.count", Value::U16(2))];
    for (key, value) in split_keys(0) {
        first.add_metadata(key, value).unwrap();
    }
    for (key, value) in split_keys(1) {
        second.add_metadata(key, value).unwrap();
    }
    second.add_metadata("general.alignment", Value::U32(64)).unwrap();
    let tensor = |i: usize| {
        let values: Vec<f32> = (0..=i).map(|j| (i * 100 + j) as f32).collect();
        (format!("t{i}"), values.len() as u64, f32_bytes(&values))
    };
    for i in 0..4 {
        let (name, len, data) = tensor(i);
        let target = if i < 3 { &mut first } else { &mut second };
        target.add_tensor(name, &[len], GgmlType::F32, data).unwrap();
    }
    assert!(std::fs::read(&paths[0]).unwrap() == first.to_bytes(), "part 1 differs");
    assert!(std::fs::read(&paths[1]).unwrap() == second.to_bytes(), "part 2 differs");

    let split = GgufFile::open(&paths[1]).unwrap();
    assert_eq!(split.alignment(), 64);
    assert_parts_consistent(&split);
    assert_eq!(split.get("general.alignment"), Some(&Value::U32(64)));
    assert!(split.metadata().iter().all(|(key, _)| !key.starts_with("split.")));
}

/// Parts from llama.cpp's tool carry `general.alignment` in the first part
/// only: the later parts use the default, and `alignment()` is the one all
/// tensors share.
#[test]
fn alignment_is_the_smallest_over_the_parts() {
    let dir = TempDir::new("align");
    let mut extra = arch();
    extra.push(("general.alignment", Value::U32(256)));
    part(keys(0, 2, 2), &extra, &["a"]).write_file(dir.join("x-00001-of-00002.gguf")).unwrap();
    part(keys(1, 2, 2), &[], &["b"]).write_file(dir.join("x-00002-of-00002.gguf")).unwrap();
    let split = GgufFile::open(dir.join("x-00001-of-00002.gguf")).unwrap();
    assert_eq!(split.alignment(), 32);
    assert_eq!(split.get("general.alignment"), Some(&Value::U32(256)));
    assert_eq!(split.data_offset() % 256, 0);
    assert_parts_consistent(&split);
}

// ---- errors ----

#[test]
fn missing_part() {
    let dir = TempDir::new("missing");
    let paths = small_model(5).write_split(dir.join("m"), 2).unwrap();
    std::fs::remove_file(&paths[2]).unwrap();
    let expected = paths[2].display().to_string();
    for p in &paths[..2] {
        expect_err(p, &["part 3 of 3 is missing", &expected, "all 3 parts", "same directory"]);
    }
    std::fs::remove_file(&paths[0]).unwrap();
    expect_err(&paths[1], &["part 1 of 3 is missing", &paths[0].display().to_string()]);
}

#[test]
fn split_count_is_bounded_and_only_existing_parts_are_opened() {
    let dir = TempDir::new("bounded");
    let first = dir.join("m-00001-of-65535.gguf");
    part(keys(0, u16::MAX, 1), &arch(), &["a"]).write_file(&first).unwrap();
    expect_err(&first, &["part 2 of 65535 is missing", "m-00002-of-65535.gguf"]);

    let big = dir.join("big-00001-of-70000.gguf");
    let keys = [Some(Value::U16(0)), Some(Value::U32(70_000)), Some(Value::I32(1))];
    part(keys, &arch(), &["a"]).write_file(&big).unwrap();
    expect_err(&big, &["split model", "big-00001-of-70000.gguf", "split.count", "0..=65535, found 70000"]);
}

#[test]
fn split_count_zero() {
    let dir = TempDir::new("zero");
    let p = dir.join("m-00001-of-00000.gguf");
    let w = part(keys(0, 0, 1), &arch(), &["a"]);
    w.write_file(&p).unwrap();
    expect_err(&p, &["m-00001-of-00000.gguf", "split.count is 0"]);
    let err = GgufFile::from_bytes(w.to_bytes()).unwrap_err().to_string();
    assert!(err.contains("split.count is 0"), "{err}");
}

#[test]
fn name_not_in_split_form() {
    let dir = TempDir::new("name");
    for name in ["model.gguf", "m-1-of-3.gguf", "m-00001-of-00003.GGUF", "m-0000a-of-00003.gguf", "00003.gguf"] {
        let p = dir.join(name);
        part(keys(0, 3, 3), &arch(), &["a"]).write_file(&p).unwrap();
        expect_err(&p, &[name, "part 1 of a model split into 3 files", "PREFIX-00001-of-00003.gguf"]);
    }
    // The name must be the one of the part the metadata says it is.
    let p = dir.join("m.gguf");
    part(keys(1, 3, 3), &[], &["a"]).write_file(&p).unwrap();
    expect_err(&p, &["part 2 of a model split into 3 files", "PREFIX-00002-of-00003.gguf"]);
}

#[test]
fn name_disagrees_with_own_split_keys() {
    let dir = TempDir::new("own");
    // Named part 2 of 3, but split.no says part 1.
    let p = dir.join("m-00002-of-00003.gguf");
    part(keys(0, 3, 3), &arch(), &["a"]).write_file(&p).unwrap();
    expect_err(&p, &["m-00002-of-00003.gguf", "name says part 2 of 3", "metadata says part 1 of 3"]);
    // Named part 1 of 4, but split.count says 3.
    let p = dir.join("m-00001-of-00004.gguf");
    part(keys(0, 3, 3), &arch(), &["a"]).write_file(&p).unwrap();
    expect_err(&p, &["name says part 1 of 4", "metadata says part 1 of 3", "m-00001-of-00003.gguf"]);
}

#[test]
fn later_part_disagrees_with_its_name_or_the_first() {
    let dir = TempDir::new("later");
    let name = |k: usize| dir.join(format!("m-{k:05}-of-00003.gguf"));
    part(keys(0, 3, 3), &arch(), &["a"]).write_file(name(1)).unwrap();
    part(keys(2, 3, 3), &[], &["c"]).write_file(name(3)).unwrap();

    // Part 2's split.no says it is part 3.
    part(keys(2, 3, 3), &[], &["b"]).write_file(name(2)).unwrap();
    expect_err(&name(1), &["m-00002-of-00003.gguf is named part 2 of 3 but its split.no says part 3"]);
    // Part 2 belongs to a split into 4.
    part(keys(1, 4, 3), &[], &["b"]).write_file(name(2)).unwrap();
    let err = expect_err(&name(1), &["m-00002-of-00003.gguf says the model has 4 parts", "says 3"]);
    assert!(err.contains("different splits"), "{err}");
    // Opening part 3 checks part 1 against it the same way.
    part(keys(0, 4, 3), &arch(), &["a"]).write_file(name(1)).unwrap();
    part(keys(1, 3, 3), &[], &["b"]).write_file(name(2)).unwrap();
    expect_err(&name(3), &["m-00001-of-00003.gguf says the model has 4 parts"]);
    // Part 2 has no split keys at all: a whole model.
    part(keys(0, 3, 3), &arch(), &["a"]).write_file(name(1)).unwrap();
    part([None, None, None], &arch(), &["b"]).write_file(name(2)).unwrap();
    expect_err(&name(1), &["m-00002-of-00003.gguf has no split.count"]);
    // Part 2 has a split.count but no split.no.
    part([None, Some(Value::U16(3)), None], &[], &["b"]).write_file(name(2)).unwrap();
    expect_err(&name(1), &["m-00002-of-00003.gguf", "split.no (which part this is) is missing"]);
    // Part 2 disagrees on the total.
    part(keys(1, 3, 4), &[], &["b"]).write_file(name(2)).unwrap();
    expect_err(&name(1), &["m-00002-of-00003.gguf says the model has 4 tensors", "first part says 3"]);
    // Part 2 is not a valid file: the error names it.
    std::fs::write(name(2), b"GGUF\x03\0\0\0").unwrap();
    expect_err(&name(1), &["m-00002-of-00003.gguf: invalid GGUF file", "the file ends at 8 bytes"]);
}

#[test]
fn tensor_in_two_parts() {
    let dir = TempDir::new("twice");
    let name = |k: usize| dir.join(format!("m-{k:05}-of-00003.gguf"));
    part(keys(0, 3, 3), &arch(), &["a"]).write_file(name(1)).unwrap();
    part(keys(1, 3, 3), &[], &["b"]).write_file(name(2)).unwrap();
    part(keys(2, 3, 3), &[], &["a"]).write_file(name(3)).unwrap();
    let (one, three) = (name(1).display().to_string(), name(3).display().to_string());
    expect_err(&name(2), &["tensor 'a' is in both", &one, &three]);
}

#[test]
fn tensor_total_disagrees_with_split_tensors_count() {
    let dir = TempDir::new("total");
    let name = |k: usize| dir.join(format!("m-{k:05}-of-00002.gguf"));
    part(keys(0, 2, 4), &arch(), &["a", "b"]).write_file(name(1)).unwrap();
    part(keys(1, 2, 4), &[], &["c"]).write_file(name(2)).unwrap();
    expect_err(&name(2), &["the 2 parts of", "m-00001-of-00002.gguf", "hold 3 tensors", "split.tensors.count says 4"]);
    // The first part must say how many there are.
    part([Some(Value::U16(0)), Some(Value::U16(2)), None], &arch(), &["a", "b"]).write_file(name(1)).unwrap();
    expect_err(&name(2), &["m-00001-of-00002.gguf", "has no split.tensors.count"]);
}

#[test]
fn hostile_split_keys() {
    let dir = TempDir::new("hostile");
    let p = dir.join("m-00001-of-00002.gguf");
    let cases: [([Option<Value>; 3], &str); 5] = [
        (
            [Some(Value::U16(2)), Some(Value::U16(2)), Some(Value::I32(1))],
            "split.no is 2 (0-based) but split.count is 2",
        ),
        (
            [Some(Value::U16(0)), Some(Value::Bool(true)), Some(Value::I32(1))],
            "metadata 'split.count': expected an integer",
        ),
        (
            [Some(Value::I16(-1)), Some(Value::U16(2)), Some(Value::I32(1))],
            "'split.no': expected an integer in 0..=65535, found -1",
        ),
        ([Some(Value::U16(0)), Some(Value::String("2".into())), None], "found a string value"),
        ([Some(Value::U16(0)), Some(Value::U16(2)), Some(Value::I32(-3))], "metadata 'split.tensors.count'"),
    ];
    for (keys, needle) in cases {
        let w = part(keys, &arch(), &["a"]);
        w.write_file(&p).unwrap();
        expect_err(&p, &[needle, "m-00001-of-00002.gguf"]);
        let err = GgufFile::from_bytes(w.to_bytes()).unwrap_err().to_string();
        assert!(err.contains(needle), "{err}");
    }
    // A control character in a tensor name stays escaped in the message.
    let name = |k: usize| dir.join(format!("c-{k:05}-of-00002.gguf"));
    part(keys(0, 2, 2), &arch(), &["x\n"]).write_file(name(1)).unwrap();
    part(keys(1, 2, 2), &[], &["x\n"]).write_file(name(2)).unwrap();
    let err = expect_err(&name(1), &["tensor 'x\\n' is in both"]);
    assert!(!err.contains('\n'));
}

#[test]
fn from_bytes_refuses_a_part() {
    let w = part(keys(1, 3, 3), &[], &["b"]);
    let err = GgufFile::from_bytes(w.to_bytes()).unwrap_err();
    assert!(matches!(err, GgufError::Invalid(_)));
    let err = err.to_string();
    assert!(err.contains("part 2 of a model split into 3 files") && err.contains("GgufFile::open"), "{err}");
}

#[test]
fn write_split_refuses_zero_tensors_per_part() {
    let dir = TempDir::new("zero-per-part");
    let err = small_model(2).write_split(dir.join("m"), 0).unwrap_err().to_string();
    assert!(err.contains("max_tensors_per_part must be at least 1"), "{err}");
    assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
}

// ---- single files ----

#[test]
fn single_file_opens_as_before() {
    let dir = TempDir::new("single");
    let w = small_model(3);
    let p = dir.join("model.gguf");
    w.write_file(&p).unwrap();
    let file = GgufFile::open(&p).unwrap();
    let bytes = GgufFile::from_bytes(w.to_bytes()).unwrap();
    assert_same_model(&file, &bytes);
    assert_eq!(file.tensors(), bytes.tensors());
    assert_eq!(file.part_paths(), std::slice::from_ref(&p));
    assert!(bytes.part_paths().is_empty());
    assert_eq!(file.tensor_part("t2"), Some(0));
    assert_eq!(file.tensor_part("nope"), None);
    assert_eq!((file.part_data_offset(0), file.part_data_offset(1)), (Some(file.data_offset()), None));
    assert_eq!(file.file_size(), std::fs::metadata(&p).unwrap().len());
    assert!(!format!("{file:?}").contains("n_parts"));

    // A file named like a part whose metadata says nothing of splitting is
    // just a file.
    let p = dir.join("m-00002-of-00003.gguf");
    w.write_file(&p).unwrap();
    assert_eq!(GgufFile::open(&p).unwrap().part_paths(), std::slice::from_ref(&p));
}

/// A one-part split (gguf-split with everything in one file) is a single
/// file: its split keys stay in the metadata, as they always did.
#[test]
fn one_part_split_is_a_single_file() {
    let dir = TempDir::new("one-part");
    let w = small_model(3);
    let paths = w.write_split(dir.join("m"), 3).unwrap();
    assert_eq!(paths, [dir.join("m-00001-of-00001.gguf")]);
    let file = GgufFile::open(&paths[0]).unwrap();
    assert_eq!(file.part_paths(), &paths[..]);
    assert_eq!(file.get("split.count"), Some(&Value::U16(1)));
    assert_eq!(file.get("split.tensors.count"), Some(&Value::I32(3)));
    assert_eq!(file.tensors().len(), 3);
    // The same bytes in memory are fine too.
    GgufFile::from_bytes(std::fs::read(&paths[0]).unwrap()).unwrap();
    // A model without tensors is one part.
    let paths = small_model(0).write_split(dir.join("empty"), 5).unwrap();
    assert_eq!(paths, [dir.join("empty-00001-of-00001.gguf")]);
    assert!(GgufFile::open(&paths[0]).unwrap().tensors().is_empty());
}
