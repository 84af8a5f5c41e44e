//! A pickle interpreter that builds data and never runs anything.
//!
//! It covers the opcodes `torch.save` writes (protocol 2, and the newer framing and memo
//! opcodes of protocols 4 and 5 so that files saved with a higher `pickle_protocol` read too).
//! A global (`GLOBAL`, `STACK_GLOBAL`) becomes a name; `REDUCE`, `NEWOBJ` and `BUILD` record
//! what would have been called, except for the few callables a checkpoint needs, which are
//! interpreted as data here (`collections.OrderedDict`, torch's tensor and parameter rebuild
//! functions). Every name that appears is kept, so the caller can say which ones a checkpoint
//! has no use for.
//!
//! Limits: every length is checked against the bytes left before anything is allocated; the
//! memo is a map (a 4-byte memo index costs nothing until used); a value nested deeper than
//! the caller walks is refused there, and dropping deep values is iterative (no stack
//! overflow on a crafted file).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::rc::Rc;

/// A pickled value, as data.
#[derive(Clone)]
pub enum Value {
    /// `None`.
    None,
    /// A bool.
    Bool(bool),
    /// An int that fits in i64.
    Int(i64),
    /// An int too large for i64: its little-endian two's-complement bytes.
    BigInt(Rc<[u8]>),
    /// A float.
    Float(f64),
    /// A str.
    Str(Rc<str>),
    /// bytes / bytearray (only the length is kept).
    Bytes(usize),
    /// A tuple.
    Tuple(Rc<Vec<Value>>),
    /// A list (or set).
    List(Rc<RefCell<Vec<Value>>>),
    /// A dict or OrderedDict, in insertion order.
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    /// A global name `module.name`, never imported.
    Global(Rc<Global>),
    /// An object built by NEWOBJ or an uninterpreted REDUCE, with the state BUILD gave it.
    Object(Rc<RefCell<Object>>),
    /// A storage named by a persistent id.
    Storage(Rc<StorageRef>),
    /// A tensor rebuilt by torch's `_rebuild_tensor_v2` (or `_rebuild_tensor`).
    Tensor(Rc<TensorRef>),
    /// A tensor kind we do not read (sparse, quantized, nested, ...): the rebuild function.
    Unsupported(Rc<str>),
}

/// A global name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Global {
    /// Module, e.g. `torch._utils`.
    pub module: String,
    /// Name in the module, e.g. `_rebuild_tensor_v2`.
    pub name: String,
}

impl std::fmt::Display for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.module, self.name)
    }
}

/// An object: the class (or callable), its arguments, and the state BUILD set.
pub struct Object {
    /// The class or callable (a `Global` when well formed).
    pub class: Value,
    /// Arguments of NEWOBJ / REDUCE.
    pub args: Value,
    /// The state from BUILD, if any.
    pub state: Option<Value>,
}

/// A storage as its persistent id names it.
#[derive(Debug, Clone)]
pub struct StorageRef {
    /// The storage type's name, e.g. `FloatStorage`.
    pub type_name: String,
    /// The key: the zip entry `data/{key}`, or the legacy storage key.
    pub key: String,
    /// Elements in the storage.
    pub numel: u64,
    /// Legacy views of a storage: offset in elements into the root storage.
    pub view_offset: u64,
}

/// A tensor: where its elements lie in its storage.
#[derive(Debug, Clone)]
pub struct TensorRef {
    /// The storage.
    pub storage: Rc<StorageRef>,
    /// Offset in elements.
    pub offset: u64,
    /// Shape.
    pub shape: Vec<u64>,
    /// Strides in elements.
    pub stride: Vec<u64>,
}

/// How a global was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Use {
    /// Named only (or used as a class: NEWOBJ).
    Named,
    /// Would have been called (REDUCE) by `pickle.load`.
    Called,
}

/// Why a pickle cannot be read.
#[derive(Debug, Clone)]
pub struct PickleError(pub String);

type Result<T> = std::result::Result<T, PickleError>;

fn err<T>(what: impl Into<String>) -> Result<T> {
    Err(PickleError(what.into()))
}

impl Drop for Value {
    fn drop(&mut self) {
        // Iterative teardown: a crafted pickle can nest lists a million deep, and the default
        // recursive drop would overflow the stack.
        let mut pending = Vec::new();
        take_children(self, &mut pending);
        while let Some(mut v) = pending.pop() {
            take_children(&mut v, &mut pending);
        }
    }
}

/// Moves out the children of `v` when `v` is their last owner.
fn take_children(v: &mut Value, into: &mut Vec<Value>) {
    match v {
        Value::Tuple(t) => {
            if let Some(t) = Rc::get_mut(t) {
                into.append(t);
            }
        }
        Value::List(l) => {
            if let Some(l) = Rc::get_mut(l) {
                into.append(l.get_mut());
            }
        }
        Value::Dict(d) => {
            if let Some(d) = Rc::get_mut(d) {
                for (k, v) in d.get_mut().drain(..) {
                    into.push(k);
                    into.push(v);
                }
            }
        }
        Value::Object(o) => {
            if let Some(o) = Rc::get_mut(o) {
                let o = o.get_mut();
                into.push(std::mem::replace(&mut o.class, Value::None));
                into.push(std::mem::replace(&mut o.args, Value::None));
                if let Some(s) = o.state.take() {
                    into.push(s);
                }
            }
        }
        _ => {}
    }
}

impl Value {
    /// The str, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A short description for messages.
    pub fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) | Value::BigInt(_) => "an int".into(),
            Value::Float(_) => "a float".into(),
            Value::Str(_) => "a str".into(),
            Value::Bytes(_) => "bytes".into(),
            Value::Tuple(_) => "a tuple".into(),
            Value::List(_) => "a list".into(),
            Value::Dict(_) => "a dict".into(),
            Value::Global(g) => format!("the global {g}"),
            Value::Object(o) => match &o.borrow().class {
                Value::Global(g) => format!("a {g} object"),
                _ => "an object".into(),
            },
            Value::Storage(_) => "a storage".into(),
            Value::Tensor(_) => "a tensor".into(),
            Value::Unsupported(f) => format!("a tensor rebuilt by {f}"),
        }
    }
}

/// A byte source that knows how many bytes it may still give.
struct Input<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Input<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.fill(&mut b)?;
        Ok(b)
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        if (buf.len() as u64) > self.left {
            return err("the pickle ends early (truncated)");
        }
        self.inner
            .read_exact(buf)
            .map_err(|e| PickleError(format!("the pickle ends early: {e}")))?;
        self.left -= buf.len() as u64;
        Ok(())
    }

    /// `n` bytes, refused before allocating when fewer are left.
    fn vec(&mut self, n: u64) -> Result<Vec<u8>> {
        if n > self.left {
            return err(format!(
                "the pickle announces {n} bytes but only {} are left (truncated)",
                self.left
            ));
        }
        let mut v = vec![0u8; n as usize];
        self.fill(&mut v)?;
        Ok(v)
    }

    /// Skips `n` bytes of a value whose content we do not keep.
    fn skip(&mut self, n: u64) -> Result<()> {
        if n > self.left {
            return err(format!(
                "the pickle announces {n} bytes but only {} are left (truncated)",
                self.left
            ));
        }
        let copied = std::io::copy(&mut (&mut self.inner).take(n), &mut std::io::sink())
            .map_err(|e| PickleError(format!("cannot read the pickle: {e}")))?;
        if copied != n {
            return err("the pickle ends early (truncated)");
        }
        self.left -= n;
        Ok(())
    }

    fn line(&mut self) -> Result<String> {
        let mut out = Vec::new();
        loop {
            let [b] = self.bytes::<1>()?;
            if b == b'\n' {
                break;
            }
            out.push(b);
        }
        String::from_utf8(out).map_err(|_| PickleError("a text argument is not UTF-8".into()))
    }
}

/// The machine: stack, marks, memo, and the globals seen.
struct Machine {
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    globals: BTreeMap<Global, Use>,
    /// Storage types of the persistent ids, by key, to refuse one key with two types.
    storages: HashMap<String, Rc<StorageRef>>,
}

/// What a pickle held: the root value and every global it named.
pub struct Unpickled {
    /// The value STOP returned.
    pub root: Value,
    /// Globals and how they were used.
    pub globals: BTreeMap<Global, Use>,
    /// Bytes the pickle took, STOP included.
    pub len: u64,
}

/// Interprets one pickle from `input`, which may give at most `limit` bytes.
pub fn load(input: impl Read, limit: u64) -> Result<Unpickled> {
    let mut input = Input {
        inner: input,
        left: limit,
    };
    let mut m = Machine {
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        globals: BTreeMap::new(),
        storages: HashMap::new(),
    };
    loop {
        let at = limit - input.left;
        let [op] = input.bytes::<1>()?;
        if op == b'.' {
            let root = m.pop()?;
            return Ok(Unpickled {
                root,
                globals: std::mem::take(&mut m.globals),
                len: limit - input.left,
            });
        }
        m.step(op, &mut input)
            .map_err(|e| PickleError(format!("at byte {at} (opcode 0x{op:02x}): {}", e.0)))?;
    }
}

fn le_u64(b: &[u8]) -> u64 {
    b.iter()
        .rev()
        .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

/// A little-endian two's-complement integer of `bytes` (LONG1 / LONG4).
fn long(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() > 8 {
        // Fits only when the extra bytes are sign extension.
        let sign = if bytes[bytes.len() - 1] & 0x80 != 0 {
            0xff
        } else {
            0
        };
        if bytes[8..].iter().any(|&b| b != sign) || (bytes[7] & 0x80 != 0) != (sign == 0xff) {
            return Value::BigInt(bytes.into());
        }
        return long(&bytes[..8]);
    }
    let mut v = le_u64(bytes);
    if bytes[bytes.len() - 1] & 0x80 != 0 && bytes.len() < 8 {
        v |= u64::MAX << (8 * bytes.len());
    }
    Value::Int(v as i64)
}

impl Machine {
    fn pop(&mut self) -> Result<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return err("a value is taken from an empty stack frame (after MARK)");
        }
        self.stack
            .pop()
            .ok_or_else(|| PickleError("the stack is empty".into()))
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| PickleError("the stack is empty".into()))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| PickleError("no MARK to pop to".into()))?;
        if m > self.stack.len() {
            return err("MARK past the stack");
        }
        Ok(self.stack.split_off(m))
    }

    fn push(&mut self, v: Value) {
        self.stack.push(v);
    }

    fn memo_put(&mut self, idx: u32) -> Result<()> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or_else(|| PickleError("memo PUT on an empty stack".into()))?;
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Result<()> {
        let v =
            self.memo.get(&idx).cloned().ok_or_else(|| {
                PickleError(format!("memo GET of entry {idx}, which was never PUT"))
            })?;
        self.push(v);
        Ok(())
    }

    fn global(&mut self, module: String, name: String) {
        let g = Global { module, name };
        self.globals.entry(g.clone()).or_insert(Use::Named);
        self.push(Value::Global(Rc::new(g)));
    }

    fn step<R: Read>(&mut self, op: u8, input: &mut Input<R>) -> Result<()> {
        match op {
            0x80 => {
                let [p] = input.bytes::<1>()?;
                if p > 5 {
                    return err(format!("pickle protocol {p} is not known (0 to 5 are)"));
                }
            }
            0x95 => {
                input.bytes::<8>()?;
            }
            b'N' => self.push(Value::None),
            0x88 => self.push(Value::Bool(true)),
            0x89 => self.push(Value::Bool(false)),
            b'J' => self.push(Value::Int(i64::from(i32::from_le_bytes(
                input.bytes::<4>()?,
            )))),
            b'K' => self.push(Value::Int(i64::from(input.bytes::<1>()?[0]))),
            b'M' => self.push(Value::Int(i64::from(u16::from_le_bytes(
                input.bytes::<2>()?,
            )))),
            0x8a => {
                let [n] = input.bytes::<1>()?;
                let b = input.vec(u64::from(n))?;
                self.push(long(&b));
            }
            0x8b => {
                let n = u32::from_le_bytes(input.bytes::<4>()?);
                let b = input.vec(u64::from(n))?;
                self.push(long(&b));
            }
            b'G' => self.push(Value::Float(f64::from_be_bytes(input.bytes::<8>()?))),
            b'I' | b'L' | b'F' => {
                let v = text_number(op, &input.line()?)?;
                self.push(v);
            }
            b'X' => {
                let n = u32::from_le_bytes(input.bytes::<4>()?);
                self.str(input, u64::from(n))?;
            }
            0x8c => {
                let [n] = input.bytes::<1>()?;
                self.str(input, u64::from(n))?;
            }
            0x8d => {
                let n = u64::from_le_bytes(input.bytes::<8>()?);
                self.str(input, n)?;
            }
            b'U' => {
                let [n] = input.bytes::<1>()?;
                self.str(input, u64::from(n))?;
            }
            b'T' => {
                let n = u32::from_le_bytes(input.bytes::<4>()?);
                self.str(input, u64::from(n))?;
            }
            b'C' => {
                let [n] = input.bytes::<1>()?;
                input.skip(u64::from(n))?;
                self.push(Value::Bytes(n as usize));
            }
            b'B' => {
                let n = u32::from_le_bytes(input.bytes::<4>()?);
                input.skip(u64::from(n))?;
                self.push(Value::Bytes(n as usize));
            }
            0x8e | 0x96 => {
                let n = u64::from_le_bytes(input.bytes::<8>()?);
                input.skip(n)?;
                self.push(Value::Bytes(n as usize));
            }
            _ => self.step_structure(op, input)?,
        }
        Ok(())
    }

    /// Containers, marks and the stack.
    fn step_structure<R: Read>(&mut self, op: u8, input: &mut Input<R>) -> Result<()> {
        match op {
            b'}' => self.push(Value::Dict(Rc::default())),
            b']' | 0x8f => self.push(Value::List(Rc::default())),
            b')' => self.push(Value::Tuple(Rc::default())),
            b'(' => self.marks.push(self.stack.len()),
            b't' => {
                let items = self.pop_mark()?;
                self.push(Value::Tuple(Rc::new(items)));
            }
            b'l' | 0x91 => {
                let items = self.pop_mark()?;
                self.push(Value::List(Rc::new(RefCell::new(items))));
            }
            b'd' => {
                let items = self.pop_mark()?;
                let d = pairs(items)?;
                self.push(Value::Dict(Rc::new(RefCell::new(d))));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if self.stack.len() < n
                    || self.marks.last().is_some_and(|&m| m > self.stack.len() - n)
                {
                    return err("TUPLE of more values than the stack frame holds");
                }
                let items = self.stack.split_off(self.stack.len() - n);
                self.push(Value::Tuple(Rc::new(items)));
            }
            b'a' => {
                let v = self.pop()?;
                append(self.top()?, vec![v])?;
            }
            b'e' | 0x90 => {
                let items = self.pop_mark()?;
                append(self.top()?, items)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                set_items(self.top()?, vec![(k, v)])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let items = pairs(items)?;
                set_items(self.top()?, items)?;
            }
            b'0' => {
                self.pop()?;
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let v = self.top()?.clone();
                self.push(v);
            }
            _ => self.step_objects(op, input)?,
        }
        Ok(())
    }

    /// The memo, globals, calls, objects and persistent ids.
    fn step_objects<R: Read>(&mut self, op: u8, input: &mut Input<R>) -> Result<()> {
        match op {
            b'p' => {
                let idx = input
                    .line()?
                    .parse()
                    .map_err(|_| PickleError("bad PUT index".into()))?;
                self.memo_put(idx)?;
            }
            b'q' => self.memo_put(u32::from(input.bytes::<1>()?[0]))?,
            b'r' => self.memo_put(u32::from_le_bytes(input.bytes::<4>()?))?,
            0x94 => {
                let idx =
                    u32::try_from(self.memo.len()).map_err(|_| PickleError("memo full".into()))?;
                self.memo_put(idx)?;
            }
            b'g' => {
                let idx = input
                    .line()?
                    .parse()
                    .map_err(|_| PickleError("bad GET index".into()))?;
                self.memo_get(idx)?;
            }
            b'h' => self.memo_get(u32::from(input.bytes::<1>()?[0]))?,
            b'j' => self.memo_get(u32::from_le_bytes(input.bytes::<4>()?))?,
            b'c' => {
                let module = input.line()?;
                let name = input.line()?;
                self.global(module, name);
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module.as_str(), name.as_str()) {
                    (Some(m), Some(n)) => {
                        let (m, n) = (m.to_string(), n.to_string());
                        self.global(m, n);
                    }
                    _ => return err("STACK_GLOBAL needs two strs"),
                }
            }
            b'R' => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = self.reduce(func, args)?;
                self.push(v);
            }
            0x81 => {
                let args = self.pop()?;
                let class = self.pop()?;
                self.push(object(class, args));
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let class = self.pop()?;
                self.push(object(class, args));
            }
            b'b' => {
                let state = self.pop()?;
                match self.top()? {
                    Value::Object(o) => o.borrow_mut().state = Some(state),
                    // OrderedDict's BUILD sets attributes (`_metadata`), not items.
                    Value::Dict(_) | Value::Tensor(_) => {}
                    other => return err(format!("BUILD on {}", other.kind())),
                }
            }
            b'Q' => {
                let pid = self.pop()?;
                let v = self.persistent(pid)?;
                self.push(v);
            }
            b'P' => return err("text persistent ids (PERSID) are not used by torch.save"),
            _ => return err(format!("opcode 0x{op:02x} is not one torch.save writes")),
        }
        Ok(())
    }

    fn str<R: Read>(&mut self, input: &mut Input<R>, n: u64) -> Result<()> {
        let b = input.vec(n)?;
        let s = String::from_utf8(b).map_err(|_| PickleError("a str is not UTF-8".into()))?;
        self.push(Value::Str(s.into()));
        Ok(())
    }

    /// `func(*args)` as data: the calls a checkpoint needs are interpreted, any other is
    /// recorded (and its global marked as one that would have been called).
    fn reduce(&mut self, func: Value, args: Value) -> Result<Value> {
        let Value::Global(g) = &func else {
            return Ok(object(func, args));
        };
        let args_v: Vec<Value> = match &args {
            Value::Tuple(t) => t.as_ref().clone(),
            _ => return err(format!("REDUCE of {g} with {} for arguments", args.kind())),
        };
        match (g.module.as_str(), g.name.as_str()) {
            ("collections", "OrderedDict") => {
                let items = match args_v.first() {
                    None => Vec::new(),
                    Some(Value::List(l)) => pairs_of_tuples(&l.borrow())?,
                    Some(other) => return err(format!("OrderedDict of {}", other.kind())),
                };
                Ok(Value::Dict(Rc::new(RefCell::new(items))))
            }
            ("builtins" | "__builtin__", "set" | "frozenset") => match args_v.first() {
                None => Ok(Value::List(Rc::default())),
                Some(Value::List(l)) => Ok(Value::List(Rc::new(RefCell::new(l.borrow().clone())))),
                Some(other) => err(format!("{g} of {}", other.kind())),
            },
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => rebuild_tensor(&args_v),
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                match args_v.into_iter().next() {
                    Some(t @ (Value::Tensor(_) | Value::Unsupported(_))) => Ok(t),
                    _ => err("_rebuild_parameter of something that is not a tensor"),
                }
            }
            ("torch._utils", f) if f.starts_with("_rebuild_") => {
                Ok(Value::Unsupported(format!("torch._utils.{f}").into()))
            }
            ("torch._tensor", "_rebuild_from_type_v2") => {
                // (func, type, args, state): a Tensor subclass; the tensor is func(*args).
                match (args_v.first(), args_v.get(2)) {
                    (Some(f), Some(a)) => {
                        let (f, a) = (f.clone(), a.clone());
                        self.reduce(f, a)
                    }
                    _ => err("_rebuild_from_type_v2 with too few arguments"),
                }
            }
            _ => {
                self.globals.insert(g.as_ref().clone(), Use::Called);
                Ok(object(func, args))
            }
        }
    }

    fn persistent(&mut self, pid: Value) -> Result<Value> {
        let Value::Tuple(t) = &pid else {
            return err(format!(
                "a persistent id that is {}, not a tuple",
                pid.kind()
            ));
        };
        if t.first().and_then(Value::as_str) != Some("storage") || t.len() < 5 {
            return err("a persistent id that is not ('storage', type, key, location, size, ...)");
        }
        let type_name = match &t[1] {
            Value::Global(g) if g.module == "torch" || g.module.starts_with("torch.") => {
                g.name.clone()
            }
            other => return err(format!("a storage whose type is {}", other.kind())),
        };
        let key = match &t[2] {
            Value::Str(s) => s.to_string(),
            Value::Int(i) => i.to_string(),
            other => return err(format!("a storage key that is {}", other.kind())),
        };
        let numel = match t[4] {
            Value::Int(n) if n >= 0 => n as u64,
            _ => {
                return err(format!(
                    "storage `{key}`: its size is not a non-negative int"
                ));
            }
        };
        // Legacy view: (view_key, offset, view_size).
        let view_offset = match t.get(5) {
            Some(Value::Tuple(v)) if v.len() == 3 => match (&v[1], &v[2]) {
                (Value::Int(o), Value::Int(n)) if *o >= 0 && *n >= 0 => {
                    let (o, n) = (*o as u64, *n as u64);
                    if o.checked_add(n).is_none_or(|end| end > numel) {
                        return err(format!("storage `{key}`: a view past its end"));
                    }
                    o
                }
                _ => return err(format!("storage `{key}`: a malformed view")),
            },
            _ => 0,
        };
        let storage = StorageRef {
            type_name,
            key: key.clone(),
            numel,
            view_offset,
        };
        if let Some(seen) = self.storages.get(&key) {
            if seen.type_name != storage.type_name || seen.numel != storage.numel {
                return err(format!(
                    "storage `{key}` is named as {} of {} elements and as {} of {}",
                    seen.type_name, seen.numel, storage.type_name, storage.numel
                ));
            }
        } else {
            self.storages.insert(key, Rc::new(storage.clone()));
        }
        Ok(Value::Storage(Rc::new(storage)))
    }
}

/// The text forms of protocol 0: INT (`00`/`01` are bools), LONG, FLOAT.
fn text_number(op: u8, line: &str) -> Result<Value> {
    let t = line.trim_end_matches('L');
    Ok(match t {
        "00" => Value::Bool(false),
        "01" => Value::Bool(true),
        _ if op == b'F' => Value::Float(
            t.parse()
                .map_err(|_| PickleError(format!("bad float `{t}`")))?,
        ),
        _ => t
            .parse()
            .map(Value::Int)
            .unwrap_or(Value::BigInt(Rc::from(&[][..]))),
    })
}

fn object(class: Value, args: Value) -> Value {
    Value::Object(Rc::new(RefCell::new(Object {
        class,
        args,
        state: None,
    })))
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return err("an odd number of values for a dict's keys and values");
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn pairs_of_tuples(items: &[Value]) -> Result<Vec<(Value, Value)>> {
    items
        .iter()
        .map(|i| match i {
            Value::Tuple(t) if t.len() == 2 => Ok((t[0].clone(), t[1].clone())),
            Value::List(l) if l.borrow().len() == 2 => {
                let l = l.borrow();
                Ok((l[0].clone(), l[1].clone()))
            }
            _ => err("an OrderedDict item that is not a (key, value) pair"),
        })
        .collect()
}

fn append(target: &mut Value, items: Vec<Value>) -> Result<()> {
    match target {
        Value::List(l) => {
            l.borrow_mut().extend(items);
            Ok(())
        }
        // An object built by REDUCE that takes appends (e.g. a list subclass): kept apart.
        Value::Object(_) => Ok(()),
        other => err(format!("APPEND to {}", other.kind())),
    }
}

fn set_items(target: &mut Value, items: Vec<(Value, Value)>) -> Result<()> {
    match target {
        Value::Dict(d) => {
            let mut d = d.borrow_mut();
            for (k, v) in items {
                // A key set twice keeps its first place, like a Python dict.
                if let Some(slot) = d.iter_mut().find(|(old, _)| same_key(old, &k)) {
                    slot.1 = v;
                } else {
                    d.push((k, v));
                }
            }
            Ok(())
        }
        Value::Object(_) => Ok(()),
        other => err(format!("SETITEM on {}", other.kind())),
    }
}

fn same_key(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => false,
    }
}

fn int(v: &Value, what: &str) -> Result<u64> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as u64),
        other => err(format!(
            "a tensor's {what} is {}, not an int ≥ 0",
            other.kind()
        )),
    }
}

fn ints(v: &Value, what: &str) -> Result<Vec<u64>> {
    match v {
        Value::Tuple(t) => t.iter().map(|x| int(x, what)).collect(),
        Value::List(l) => l.borrow().iter().map(|x| int(x, what)).collect(),
        other => err(format!(
            "a tensor's {what} is {}, not a tuple",
            other.kind()
        )),
    }
}

/// `_rebuild_tensor_v2(storage, offset, size, stride, ...)` as data.
fn rebuild_tensor(args: &[Value]) -> Result<Value> {
    let [storage, offset, size, stride, ..] = args else {
        return err("_rebuild_tensor_v2 with fewer than 4 arguments");
    };
    let Value::Storage(storage) = storage else {
        return err(format!(
            "_rebuild_tensor_v2 of {}, not a storage",
            storage.kind()
        ));
    };
    let shape = ints(size, "size")?;
    let stride = ints(stride, "stride")?;
    if shape.len() != stride.len() {
        return err(format!(
            "storage `{}`: a tensor of {} dimensions with {} strides",
            storage.key,
            shape.len(),
            stride.len()
        ));
    }
    if shape.len() > 64 {
        return err(format!(
            "storage `{}`: a tensor of {} dimensions",
            storage.key,
            shape.len()
        ));
    }
    Ok(Value::Tensor(Rc::new(TensorRef {
        storage: storage.clone(),
        offset: int(offset, "storage offset")?,
        shape,
        stride,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_bytes(b: &[u8]) -> Result<Unpickled> {
        load(b, b.len() as u64)
    }

    #[test]
    fn long_is_twos_complement() {
        assert!(matches!(long(&[]), Value::Int(0)));
        assert!(matches!(long(&[0xff]), Value::Int(-1)));
        assert!(matches!(long(&[0x00, 0x80]), Value::Int(-32768)));
        assert!(matches!(long(&[0xff, 0x00]), Value::Int(255)));
        assert!(matches!(long(&[0xff; 9]), Value::Int(-1)));
        assert!(matches!(
            long(&[0, 0, 0, 0, 0, 0, 0, 0, 1]),
            Value::BigInt(_)
        ));
    }

    #[test]
    fn memo_shares_mutable_values() {
        // d = {}; memo[0] = d; l = [d]; d['k'] = 1 -> l[0] sees 'k'.
        let p = b"\x80\x02}q\x00]h\x00a0h\x00X\x01\x00\x00\x00kK\x01s0h\x00.";
        let u = load_bytes(p).unwrap();
        match &u.root {
            Value::Dict(d) => assert_eq!(d.borrow().len(), 1),
            other => panic!("{}", other.kind()),
        }
    }

    #[test]
    fn reduce_is_recorded_not_called() {
        let p = b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R.";
        let u = load_bytes(p).unwrap();
        let g = Global {
            module: "posix".into(),
            name: "system".into(),
        };
        assert_eq!(u.globals.get(&g), Some(&Use::Called));
        assert!(matches!(u.root, Value::Object(_)));
    }

    #[test]
    fn stack_underflow_and_marks_are_errors() {
        for p in [
            &b"\x80\x02."[..],
            b"\x80\x02(0.",
            b"\x80\x02a.",
            b"\x80\x02u.",
            b"\x80\x02N(\x85.",
        ] {
            assert!(load_bytes(p).is_err(), "{p:?}");
        }
    }
}
