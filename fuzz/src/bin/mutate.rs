//! The fuzzer for machines without a nightly toolchain: a plain-Rust mutation loop over the same
//! entry point as the libFuzzer target, for a set time.
//!
//!     mutate SECONDS [CORPUS_DIR_OR_FILE ...]   fuzz; exit 1 and save the input on a panic
//!     mutate --write-seeds DIR                  write the built-in seed checkpoints to DIR
//!
//! Without coverage feedback it keeps a mutated input when it got at least as far (see
//! [`Depth`]) as the input it came from, and mutates the safetensors header as text (numbers,
//! dtypes, name segments) with its length fixed up, so that mutants get past the parser. A
//! PyTorch checkpoint (torch zip or legacy stream) has its pickle mutated in place — opcodes,
//! their arguments, storage type names of the same length — so the zip around it stays whole
//! and the pickle interpreter, not the zip reader, meets the damage.

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use repvgg_fuse_fuzz::{Depth, clean_up, load_and_detect, seeds};

/// Inputs larger than this are not loaded from the corpus (the fixtures are ~100 KB).
const MAX_INPUT: usize = 1 << 20;
/// Inputs kept for mutation at most.
const MAX_POOL: usize = 4096;

const DTYPES: &[&str] = &[
    "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
    "F4", "F6_E2M3", "F8_E4M3", "F8_E5M2", "C64", "X",
];
const SEGMENTS: &[&str] = &[
    "conv_kxk",
    "conv_1x1",
    "conv_scale",
    "identity",
    "rbr_dense",
    "rbr_1x1",
    "rbr_identity",
    "rbr_conv",
    "rbr_scale",
    "rbr_skip",
    "branch_3x3",
    "branch_1x1",
    "branch_norm",
    "conv1",
    "conv2",
    "conv",
    "bn",
    "norm",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
    "reparam_conv",
    "rbr_reparam",
    "0",
    "1",
    "2",
    "10",
    "__metadata__",
    "dtype",
    "shape",
    "data_offsets",
];
const NUMBERS: &[&str] = &[
    "0",
    "1",
    "2",
    "3",
    "5",
    "7",
    "8",
    "9",
    "31",
    "33",
    "-1",
    "1.5",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999",
];

/// xorshift64*: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Splits a safetensors file into (header text, data) when its length field fits.
fn split(input: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let len = u64::from_le_bytes(input.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(len).ok()?)?;
    let header = input.get(8..end)?.to_vec();
    Some((header, input[end..].to_vec()))
}

fn join(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    out
}

/// Replaces one occurrence (chosen at random) of any of `from` in `text` by a pick of `to`.
fn swap_token(rng: &mut Rng, text: &mut Vec<u8>, from: &[&str], to: &[&str]) {
    let mut hits = Vec::new();
    for token in from {
        let t = token.as_bytes();
        for i in 0..text.len().saturating_sub(t.len() - 1) {
            if &text[i..i + t.len()] == t {
                hits.push((i, t.len()));
            }
        }
    }
    if hits.is_empty() {
        return;
    }
    let (at, len) = *rng.pick(&hits);
    let new = rng.pick(to).as_bytes();
    text.splice(at..at + len, new.iter().copied());
}

/// Replaces one run of ASCII digits in `text` by another number.
fn swap_number(rng: &mut Rng, text: &mut Vec<u8>) {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < text.len() {
        if text[i].is_ascii_digit() {
            let start = i;
            while i < text.len() && text[i].is_ascii_digit() {
                i += 1;
            }
            runs.push(start..i);
        } else {
            i += 1;
        }
    }
    if runs.is_empty() {
        return;
    }
    let run = rng.pick(&runs).clone();
    let old: u64 = std::str::from_utf8(&text[run.clone()])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let new = match rng.below(4) {
        0 => rng.pick(NUMBERS).to_string(),
        1 => old.wrapping_add(1 + rng.below(8) as u64).to_string(),
        2 => old.saturating_sub(1 + rng.below(8) as u64).to_string(),
        _ => old.wrapping_mul(2).to_string(),
    };
    text.splice(run, new.bytes());
}

/// Where the pickle of a torch.save file lies: the first zip entry's data (torch writes
/// `data.pkl` first), or the head of a legacy stream.
fn pickle_range(input: &[u8]) -> Option<std::ops::Range<usize>> {
    if input.starts_with(b"PK\x03\x04") && input.len() >= 30 {
        let u16_at = |i: usize| usize::from(u16::from_le_bytes([input[i], input[i + 1]]));
        let size = u16_at(18) | (u16_at(20) << 16);
        let start = 30 + u16_at(26) + u16_at(28);
        let end = start.checked_add(size)?;
        (end <= input.len() && start < end).then_some(start..end)
    } else if input.first() == Some(&0x80) && input.len() > 2 {
        Some(2..input.len().min(1 << 16))
    } else {
        None
    }
}

/// Opcodes torch.save writes (and a few it does not), for in-place swaps.
const OPCODES: &[u8] = b"NJKM\x8a\x8bGX\x8c}])(tlds\x85\x86\x87aeu012pqrghjc\x93R\x81b.Q\x88\x89\x8f\x90\x94\x95";
/// Storage type names, grouped by length so a swap keeps every offset in the zip right.
const STORAGES: &[&[&str]] = &[
    &["FloatStorage", "QInt8Storage", "ShortStorage"],
    &["HalfStorage", "LongStorage", "ByteStorage", "CharStorage", "BoolStorage"],
    &["_rebuild_tensor_v2", "_rebuild_parameter"],
];

/// Mutates the pickle of a torch.save file in place (same length).
fn mutate_pickle(rng: &mut Rng, out: &mut [u8], range: std::ops::Range<usize>) {
    let at = range.start + rng.below(range.len());
    match rng.below(4) {
        0 => out[at] = *rng.pick(OPCODES),
        1 => out[at] = out[at].wrapping_add(1 + rng.below(3) as u8),
        2 => out[at] = *rng.pick(&[0u8, 0x7f, 0x80, 0xff]),
        _ => {
            let group = *rng.pick(STORAGES);
            let mut slice = out[range.clone()].to_vec();
            swap_token(rng, &mut slice, group, group);
            if slice.len() == range.len() {
                out[range].copy_from_slice(&slice);
            }
        }
    }
}

fn mutate(rng: &mut Rng, input: &[u8], pool: &[(Vec<u8>, Depth)]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if rng.below(2) == 0
            && let Some(range) = pickle_range(&out)
        {
            mutate_pickle(rng, &mut out, range);
            continue;
        }
        // Header-level mutations keep the length field right, so the parser reads on.
        if rng.below(2) == 0
            && let Some((mut header, mut data)) = split(&out)
        {
            match rng.below(5) {
                0 => swap_token(rng, &mut header, DTYPES, DTYPES),
                1 => swap_token(rng, &mut header, SEGMENTS, SEGMENTS),
                2 => swap_number(rng, &mut header),
                3 => {
                    // Poison a value: NaN, ±inf, negative, huge or zero in the data.
                    if data.len() >= 4 {
                        let at = rng.below(data.len() / 4) * 4;
                        let v: f32 = *rng.pick(&[
                            f32::NAN,
                            f32::INFINITY,
                            f32::NEG_INFINITY,
                            -1.0,
                            0.0,
                            1e30,
                            65504.0,
                        ]);
                        data[at..at + 4].copy_from_slice(&v.to_le_bytes());
                    }
                }
                _ => {
                    // Drop or repeat a data byte range: offsets no longer tile the data.
                    if !data.is_empty() {
                        let at = rng.below(data.len());
                        let len = 1 + rng.below(16.min(data.len() - at));
                        if rng.below(2) == 0 {
                            data.drain(at..at + len);
                        } else {
                            let chunk = data[at..at + len].to_vec();
                            data.splice(at..at, chunk);
                        }
                    }
                }
            }
            out = join(&header, &data);
            continue;
        }
        match rng.below(6) {
            0 if !out.is_empty() => {
                let at = rng.below(out.len());
                out[at] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let at = rng.below(out.len());
                out[at] = *rng.pick(b"\0\xff\x7f\x80{}[]\",:0123456789-. ");
            }
            2 if !out.is_empty() => {
                let at = rng.below(out.len());
                out.truncate(at);
            }
            3 => {
                let at = rng.below(out.len() + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                out.splice(at..at, bytes);
            }
            4 if out.len() >= 8 => {
                // A header length that lies.
                let len = u64::from_le_bytes(out[..8].try_into().unwrap_or([0; 8]));
                let new = match rng.below(3) {
                    0 => len.wrapping_add(rng.below(64) as u64),
                    1 => len.wrapping_sub(rng.below(64) as u64),
                    _ => rng.next(),
                };
                out[..8].copy_from_slice(&new.to_le_bytes());
            }
            _ => {
                // Splice the head of this input onto the tail of another.
                let (other, _) = rng.pick(pool);
                let cut = rng.below(out.len() + 1);
                let from = rng.below(other.len() + 1);
                out.truncate(cut);
                out.extend_from_slice(&other[from..]);
            }
        }
    }
    out
}

fn load_corpus(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut add = |p: &Path| {
        if let Ok(bytes) = std::fs::read(p)
            && bytes.len() <= MAX_INPUT
        {
            out.push(bytes);
        }
    };
    for path in paths {
        if path.is_dir() {
            if let Ok(entries) = std::fs::read_dir(path) {
                for e in entries.flatten() {
                    if e.path().is_file() {
                        add(&e.path());
                    }
                }
            }
        } else {
            add(path);
        }
    }
    out
}

/// Runs one input; on a panic saves it under `artifacts/load_and_detect/` and says where.
fn run_one(input: &[u8]) -> Result<Depth, PathBuf> {
    match panic::catch_unwind(AssertUnwindSafe(|| load_and_detect(input))) {
        Ok(depth) => Ok(depth),
        Err(_) => {
            let dir = PathBuf::from("artifacts/load_and_detect");
            let _ = std::fs::create_dir_all(&dir);
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for b in input {
                h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
            }
            let path = dir.join(format!("crash-{h:016x}"));
            let _ = std::fs::write(&path, input);
            Err(path)
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--write-seeds") {
        let Some(dir) = args.get(1) else {
            eprintln!("usage: mutate --write-seeds DIR");
            return ExitCode::from(2);
        };
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("{dir}: {e}");
            return ExitCode::from(2);
        }
        for (name, bytes) in seeds() {
            let path = Path::new(dir).join(format!("seed-{name}.safetensors"));
            if let Err(e) = std::fs::write(&path, bytes) {
                eprintln!("{}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
        return ExitCode::SUCCESS;
    }
    let Some(seconds) = args.first().and_then(|s| s.parse::<u64>().ok()) else {
        eprintln!("usage: mutate SECONDS [CORPUS_DIR_OR_FILE ...] | mutate --write-seeds DIR");
        return ExitCode::from(2);
    };
    let paths: Vec<PathBuf> = args[1..].iter().map(PathBuf::from).collect();
    let mut initial: Vec<Vec<u8>> = seeds().into_iter().map(|(_, b)| b).collect();
    initial.extend(load_corpus(&paths));
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let mut rng = Rng(seed | 1);
    println!(
        "mutate: {} inputs to start from, {seconds} s, seed {seed}",
        initial.len()
    );

    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut execs: u64 = 0;
    let mut reached = [0u64; 4];
    let mut next_report = start + Duration::from_secs(10);
    // The starting inputs themselves first; the pool keeps each input with its depth.
    let mut pool: Vec<(Vec<u8>, Depth)> = Vec::new();
    for input in initial {
        match run_one(&input) {
            Ok(d) => {
                reached[d as usize] += 1;
                pool.push((input, d));
            }
            Err(path) => {
                eprintln!("mutate: CRASH on a seed input, saved to {}", path.display());
                return ExitCode::from(1);
            }
        }
        execs += 1;
    }
    while Instant::now() < deadline {
        let (parent, parent_depth) = &pool[rng.below(pool.len())];
        let parent_depth = *parent_depth;
        let child = mutate(&mut rng, parent, &pool);
        match run_one(&child) {
            Ok(depth) => {
                reached[depth as usize] += 1;
                if depth >= Depth::Loaded && depth >= parent_depth {
                    if pool.len() < MAX_POOL {
                        pool.push((child, depth));
                    } else {
                        pool[rng.below(MAX_POOL)] = (child, depth);
                    }
                }
            }
            Err(path) => {
                eprintln!(
                    "mutate: CRASH after {execs} execs ({:.0} s); input saved to {}",
                    start.elapsed().as_secs_f64(),
                    path.display()
                );
                return ExitCode::from(1);
            }
        }
        execs += 1;
        if Instant::now() >= next_report {
            println!(
                "mutate: {execs} execs, {:.0}/s, pool {}",
                execs as f64 / start.elapsed().as_secs_f64(),
                pool.len()
            );
            next_report += Duration::from_secs(10);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    clean_up();
    println!(
        "mutate: done: {execs} execs in {secs:.0} s ({:.0}/s), no crash; refused {}, loaded {}, blocks found {}, fused {}",
        execs as f64 / secs,
        reached[0],
        reached[1],
        reached[2],
        reached[3]
    );
    ExitCode::SUCCESS
}
