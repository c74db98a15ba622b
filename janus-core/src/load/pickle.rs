//! PyTorch `.bin` checkpoints (the zip container `torch.save` writes).
//!
//! The tensors are read lazily by `pytorch-reader`, which never executes the pickle. Before that,
//! the pickle's opcodes are walked here and every global it imports (`GLOBAL`, `INST`,
//! `STACK_GLOBAL`) must be one that a plain state dict needs: anything else — `os.system`,
//! `builtins.eval`, a model class — means the file is not a state dict, and it is refused.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

use super::{StoredDType, TensorInfo, TensorSource};

/// Globals a `torch.save(state_dict)` pickle may import.
fn allowed_global(module: &str, name: &str) -> bool {
    match module {
        "collections" => name == "OrderedDict",
        "torch._utils" => matches!(
            name,
            "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_parameter"
        ),
        "torch" => {
            name.ends_with("Storage")
                && matches!(
                    name,
                    "FloatStorage"
                        | "HalfStorage"
                        | "BFloat16Storage"
                        | "DoubleStorage"
                        | "LongStorage"
                        | "IntStorage"
                        | "ShortStorage"
                        | "CharStorage"
                        | "ByteStorage"
                        | "BoolStorage"
                )
                || matches!(
                    name,
                    "float32"
                        | "float16"
                        | "bfloat16"
                        | "float64"
                        | "int64"
                        | "int32"
                        | "uint8"
                        | "int8"
                        | "int16"
                        | "bool"
                )
        }
        _ => false,
    }
}

/// What the walk of a pickle found wrong, if anything.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PickleProblem {
    /// A global outside the allow-list.
    Foreign(String),
    /// A `STACK_GLOBAL` whose operands are not literal strings.
    ComputedGlobal,
    /// The byte stream is not a well-formed pickle.
    Malformed(String),
}

/// Walks every opcode of a pickle and checks the globals it imports.
pub(crate) fn scan_pickle(data: &[u8]) -> Result<(), PickleProblem> {
    let mut pos = 0usize;
    // The last two pushes, when they were strings (for STACK_GLOBAL).
    let mut recent: [Option<String>; 2] = [None, None];
    let mut memo: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    let mut next_memo: u64 = 0;
    let malformed = |msg: &str| PickleProblem::Malformed(msg.to_string());

    fn take<'a>(data: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8], PickleProblem> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| PickleProblem::Malformed("truncated pickle".into()))?;
        let s = &data[*pos..end];
        *pos = end;
        Ok(s)
    }
    fn uint(bytes: &[u8]) -> u64 {
        bytes
            .iter()
            .rev()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    }
    fn line<'a>(data: &'a [u8], pos: &mut usize) -> Result<&'a [u8], PickleProblem> {
        let rest = &data[*pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| PickleProblem::Malformed("unterminated text argument".into()))?;
        *pos += n + 1;
        Ok(&rest[..n])
    }
    fn push(recent: &mut [Option<String>; 2], value: Option<String>) {
        recent[0] = recent[1].take();
        recent[1] = value;
    }
    let check = |module: &str, name: &str| -> Result<(), PickleProblem> {
        if allowed_global(module, name) {
            Ok(())
        } else {
            Err(PickleProblem::Foreign(format!("{module}.{name}")))
        }
    };

    loop {
        let op = *data.get(pos).ok_or_else(|| malformed("no STOP opcode"))?;
        pos += 1;
        match op {
            b'.' => return Ok(()),
            // Text-line arguments.
            b'c' | b'i' => {
                let module = String::from_utf8_lossy(line(data, &mut pos)?).into_owned();
                let name = String::from_utf8_lossy(line(data, &mut pos)?).into_owned();
                check(&module, &name)?;
                push(&mut recent, None);
            }
            b'V' => {
                let s = String::from_utf8_lossy(line(data, &mut pos)?).into_owned();
                push(&mut recent, Some(s));
            }
            b'I' | b'L' | b'F' | b'S' | b'P' => {
                line(data, &mut pos)?;
                push(&mut recent, None);
            }
            b'p' => {
                let idx = line(data, &mut pos)?;
                let idx: u64 = std::str::from_utf8(idx)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| malformed("bad PUT index"))?;
                if let Some(s) = &recent[1] {
                    memo.insert(idx, s.clone());
                }
            }
            b'g' => {
                let idx = line(data, &mut pos)?;
                let idx: Option<u64> = std::str::from_utf8(idx)
                    .ok()
                    .and_then(|s| s.trim().parse().ok());
                let v = idx.and_then(|i| memo.get(&i).cloned());
                push(&mut recent, v);
            }
            // Memo stores: they do not change the stack.
            b'q' | b'r' => {
                let n = if op == b'q' { 1 } else { 4 };
                let idx = uint(take(data, &mut pos, n)?);
                if let Some(s) = &recent[1] {
                    memo.insert(idx, s.clone());
                }
            }
            0x94 => {
                if let Some(s) = &recent[1] {
                    memo.insert(next_memo, s.clone());
                }
                next_memo += 1;
            }
            b'h' | b'j' => {
                let n = if op == b'h' { 1 } else { 4 };
                let idx = uint(take(data, &mut pos, n)?);
                let v = memo.get(&idx).cloned();
                push(&mut recent, v);
            }
            // Strings with a length prefix.
            0x8c | b'X' | 0x8d => {
                let n = match op {
                    0x8c => 1,
                    b'X' => 4,
                    _ => 8,
                };
                let len = uint(take(data, &mut pos, n)?);
                let len = usize::try_from(len).map_err(|_| malformed("string too long"))?;
                let s = String::from_utf8_lossy(take(data, &mut pos, len)?).into_owned();
                push(&mut recent, Some(s));
            }
            b'U' | b'T' | b'B' | b'C' | 0x8e | 0x96 | 0x8a | 0x8b => {
                let n = match op {
                    b'U' | b'C' | 0x8a => 1,
                    b'T' | b'B' | 0x8b => 4,
                    _ => 8,
                };
                let len = uint(take(data, &mut pos, n)?);
                let len = usize::try_from(len).map_err(|_| malformed("argument too long"))?;
                take(data, &mut pos, len)?;
                push(&mut recent, None);
            }
            0x93 => {
                // STACK_GLOBAL: module and name are the two items on top of the stack.
                match (&recent[0], &recent[1]) {
                    (Some(module), Some(name)) => check(module, name)?,
                    _ => return Err(PickleProblem::ComputedGlobal),
                }
                push(&mut recent, None);
            }
            // Fixed-size arguments.
            b'K' | 0x80 | 0x82 => {
                take(data, &mut pos, 1)?;
                if op != 0x80 {
                    push(&mut recent, None);
                }
            }
            b'M' | 0x83 => {
                take(data, &mut pos, 2)?;
                push(&mut recent, None);
            }
            b'J' | 0x84 => {
                take(data, &mut pos, 4)?;
                push(&mut recent, None);
            }
            b'G' => {
                take(data, &mut pos, 8)?;
                push(&mut recent, None);
            }
            0x95 => {
                take(data, &mut pos, 8)?;
            }
            // No argument.
            b'(' | b'0' | b'1' | b'2' | b'N' | b')' | b']' | b'}' | b'a' | b'e' | b's' | b'u'
            | b't' | b'l' | b'd' | b'b' | b'R' | b'o' | b'Q' | 0x85 | 0x86 | 0x87 | 0x88 | 0x89
            | 0x81 | 0x92 | 0x8f | 0x90 | 0x91 | 0x97 | 0x98 => {
                push(&mut recent, None);
            }
            other => {
                return Err(PickleProblem::Malformed(format!(
                    "unknown opcode 0x{other:02x}"
                )));
            }
        }
    }
}

/// Opens one `.bin` file: checks its pickle, then lists its tensors (bytes are read later).
pub(crate) fn open(path: &Path) -> Result<Vec<TensorInfo>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| {
        Error::checkpoint(
            path,
            format!(
                "not a PyTorch zip checkpoint (legacy torch.save files are not supported): {e}"
            ),
        )
    })?;
    let pkl_names: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n.ends_with("data.pkl"))
        .collect();
    let [pkl_name] = pkl_names.as_slice() else {
        return Err(Error::checkpoint(
            path,
            format!(
                "expected one data.pkl in the archive, found {}",
                pkl_names.len()
            ),
        ));
    };
    let mut pickle = Vec::new();
    {
        let entry = archive
            .by_name(pkl_name)
            .map_err(|e| Error::checkpoint(path, format!("cannot read {pkl_name}: {e}")))?;
        if entry.size() > pytorch_reader::MAX_PICKLE_SIZE {
            return Err(Error::checkpoint(path, "pickle is implausibly large"));
        }
        entry
            .take(pytorch_reader::MAX_PICKLE_SIZE)
            .read_to_end(&mut pickle)
            .map_err(|e| Error::checkpoint(path, format!("cannot read {pkl_name}: {e}")))?;
    }
    drop(archive);
    match scan_pickle(&pickle) {
        Ok(()) => {}
        Err(PickleProblem::Foreign(global)) => {
            return Err(Error::UnsafePickle {
                path: path.to_path_buf(),
                global,
            });
        }
        Err(PickleProblem::ComputedGlobal) => {
            return Err(Error::UnsafePickle {
                path: path.to_path_buf(),
                global: "<computed STACK_GLOBAL>".into(),
            });
        }
        Err(PickleProblem::Malformed(msg)) => {
            return Err(Error::checkpoint(path, format!("malformed pickle: {msg}")));
        }
    }

    let reader = pytorch_reader::PytorchReader::new(path)
        .map_err(|e| Error::checkpoint(path, format!("cannot read checkpoint: {e}")))?;
    let mut out = Vec::with_capacity(reader.len());
    for (name, tensor) in reader.into_tensors() {
        let dtype = match tensor.dtype() {
            pytorch_reader::DType::F32 => StoredDType::F32,
            pytorch_reader::DType::F16 => StoredDType::F16,
            pytorch_reader::DType::BF16 => StoredDType::BF16,
            pytorch_reader::DType::F64 => StoredDType::F64,
            other => StoredDType::Other(format!("{other:?}")),
        };
        out.push(TensorInfo {
            name,
            dtype,
            shape: tensor.shape().to_vec(),
            source: TensorSource::Pickle(tensor),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol-2 pickle importing `module.name` with GLOBAL, then STOP.
    fn global_pickle(module: &str, name: &str) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'c'];
        p.extend_from_slice(module.as_bytes());
        p.push(b'\n');
        p.extend_from_slice(name.as_bytes());
        p.push(b'\n');
        p.extend_from_slice(b")R.");
        p
    }

    /// A protocol-4 pickle importing `module.name` with STACK_GLOBAL via memoised strings.
    fn stack_global_pickle(module: &str, name: &str) -> Vec<u8> {
        let mut p = vec![0x80, 4];
        for s in [module, name] {
            p.push(0x8c);
            p.push(s.len() as u8);
            p.extend_from_slice(s.as_bytes());
            p.push(0x94);
        }
        p.push(0x93);
        // Re-use the module string from the memo for a second import.
        p.extend_from_slice(&[b'h', 0]);
        p.extend_from_slice(&[b'h', 1]);
        p.push(0x93);
        p.push(b'.');
        p
    }

    #[test]
    fn state_dict_globals_pass() {
        assert_eq!(
            scan_pickle(&global_pickle("collections", "OrderedDict")),
            Ok(())
        );
        assert_eq!(
            scan_pickle(&stack_global_pickle("torch._utils", "_rebuild_tensor_v2")),
            Ok(())
        );
        assert_eq!(
            scan_pickle(&global_pickle("torch", "BFloat16Storage")),
            Ok(())
        );
    }

    #[test]
    fn foreign_globals_are_refused() {
        assert_eq!(
            scan_pickle(&global_pickle("os", "system")),
            Err(PickleProblem::Foreign("os.system".into()))
        );
        assert_eq!(
            scan_pickle(&stack_global_pickle("builtins", "eval")),
            Err(PickleProblem::Foreign("builtins.eval".into()))
        );
        assert_eq!(
            scan_pickle(&global_pickle("torch", "load")),
            Err(PickleProblem::Foreign("torch.load".into()))
        );
    }

    #[test]
    fn computed_stack_global_is_refused() {
        // Operands built by a call rather than pushed as strings.
        let p = vec![0x80, 4, b'N', b'N', 0x93, b'.'];
        assert_eq!(scan_pickle(&p), Err(PickleProblem::ComputedGlobal));
    }

    #[test]
    fn malformed_pickles_are_errors() {
        assert!(matches!(scan_pickle(&[]), Err(PickleProblem::Malformed(_))));
        assert!(matches!(
            scan_pickle(&[0x80, 2, 0x8c, 50, b'a']),
            Err(PickleProblem::Malformed(_))
        ));
        assert!(matches!(
            scan_pickle(&[0xff]),
            Err(PickleProblem::Malformed(_))
        ));
        assert!(matches!(
            scan_pickle(&[0x80, 2, b'c', b'o', b's']),
            Err(PickleProblem::Malformed(_))
        ));
    }
}
