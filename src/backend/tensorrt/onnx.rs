//! Just enough of the ONNX protobuf to plan an engine build: the opset, the graph's real inputs
//! and outputs (name, element type, dimensions) and each node's name, op type and outputs. A
//! hand-written reader of the protobuf wire format (varints and length-delimited fields), so no
//! protobuf compiler or ONNX library is needed; everything else in the file is skipped unread.

use super::meta::ElemType;
use crate::error::Result;
use std::path::Path;

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    /// A symbolic (dynamic) dimension, e.g. `batch_size`.
    Named(String),
    Unknown,
}

/// A graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueInfo {
    pub name: String,
    pub elem_type: ElemType,
    pub dims: Vec<Dim>,
}

/// A node of the main graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub op_type: String,
    pub outputs: Vec<String>,
}

/// What gpt2rt reads of an ONNX model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OnnxModel {
    /// Version of the default ("" or "ai.onnx") operator set.
    pub opset: Option<i64>,
    /// Graph inputs that are not initializers (the tensors a caller feeds).
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
    pub nodes: Vec<Node>,
}

impl OnnxModel {
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::NotFound {
                crate::ErrorKind::FileNotFound
            } else {
                crate::ErrorKind::Io
            };
            crate::Error::new(kind, format!("{}: {e}", path.display()))
        })?;
        Self::parse(&bytes).map_err(|e| e.context(format!("{} is not a readable ONNX model", path.display())))
    }

    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut model = Self::default();
        let mut graph = None;
        for field in Fields(bytes) {
            let (number, value) = field?;
            match (number, value) {
                (7, Value::Bytes(g)) => graph = Some(g),
                (8, Value::Bytes(opset)) => {
                    let (mut domain, mut version) = (String::new(), None);
                    for f in Fields(opset) {
                        match f? {
                            (1, Value::Bytes(d)) => domain = text(d)?,
                            (2, Value::Int(v)) => version = Some(v as i64),
                            _ => {}
                        }
                    }
                    if domain.is_empty() || domain == "ai.onnx" {
                        model.opset = version;
                    }
                }
                _ => {}
            }
        }
        let Some(graph) = graph else {
            bail!(ModelFormat, "no graph (field 7 of ModelProto)");
        };
        let mut initializers = Vec::new();
        let mut inputs = Vec::new();
        for field in Fields(graph) {
            match field? {
                (1, Value::Bytes(node)) => model.nodes.push(parse_node(node)?),
                (5, Value::Bytes(tensor)) => {
                    for f in Fields(tensor) {
                        if let (8, Value::Bytes(name)) = f? {
                            initializers.push(text(name)?);
                        }
                    }
                }
                (11, Value::Bytes(info)) => inputs.push(parse_value_info(info)?),
                (12, Value::Bytes(info)) => model.outputs.push(parse_value_info(info)?),
                _ => {}
            }
        }
        model.inputs = inputs.into_iter().filter(|i| !initializers.contains(&i.name)).collect();
        Ok(model)
    }

    pub fn input(&self, name: &str) -> Option<&ValueInfo> {
        self.inputs.iter().find(|i| i.name == name)
    }
}

fn parse_node(bytes: &[u8]) -> Result<Node> {
    let mut node = Node { name: String::new(), op_type: String::new(), outputs: Vec::new() };
    for f in Fields(bytes) {
        match f? {
            (2, Value::Bytes(o)) => node.outputs.push(text(o)?),
            (3, Value::Bytes(n)) => node.name = text(n)?,
            (4, Value::Bytes(op)) => node.op_type = text(op)?,
            _ => {}
        }
    }
    Ok(node)
}

fn parse_value_info(bytes: &[u8]) -> Result<ValueInfo> {
    let mut info = ValueInfo { name: String::new(), elem_type: ElemType::Other("unknown"), dims: Vec::new() };
    for f in Fields(bytes) {
        match f? {
            (1, Value::Bytes(n)) => info.name = text(n)?,
            (2, Value::Bytes(type_proto)) => {
                for f in Fields(type_proto) {
                    let (1, Value::Bytes(tensor)) = f? else { continue };
                    for f in Fields(tensor) {
                        match f? {
                            (1, Value::Int(t)) => info.elem_type = ElemType::from_onnx(t as i64),
                            (2, Value::Bytes(shape)) => {
                                for f in Fields(shape) {
                                    let (1, Value::Bytes(dim)) = f? else { continue };
                                    let mut d = Dim::Unknown;
                                    for f in Fields(dim) {
                                        match f? {
                                            (1, Value::Int(v)) => d = Dim::Fixed(v as i64),
                                            (2, Value::Bytes(p)) => d = Dim::Named(text(p)?),
                                            _ => {}
                                        }
                                    }
                                    info.dims.push(d);
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

fn text(bytes: &[u8]) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| err!(ModelFormat, "a name is not valid UTF-8"))
}

/// A field's value: varints (and fixed-width numbers) as integers, length-delimited as bytes.
enum Value<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

/// The fields of one protobuf message, in order.
struct Fields<'a>(&'a [u8]);

fn varint(bytes: &mut &[u8]) -> Result<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let Some((&b, rest)) = bytes.split_first() else {
            bail!(ModelFormat, "truncated protobuf varint");
        };
        *bytes = rest;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
    bail!(ModelFormat, "protobuf varint longer than 10 bytes")
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u64, Value<'a>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let result = (|| {
            let key = varint(&mut self.0)?;
            let (number, wire) = (key >> 3, key & 7);
            let mut fixed = |n: usize| -> Result<u64> {
                if self.0.len() < n {
                    bail!(ModelFormat, "truncated protobuf field {number}");
                }
                let (head, rest) = self.0.split_at(n);
                self.0 = rest;
                Ok(head.iter().rev().fold(0, |acc, &b| (acc << 8) | u64::from(b)))
            };
            let value = match wire {
                0 => Value::Int(varint(&mut self.0)?),
                1 => Value::Int(fixed(8)?),
                5 => Value::Int(fixed(4)?),
                2 => {
                    let len = varint(&mut self.0)?;
                    if len > self.0.len() as u64 {
                        bail!(ModelFormat, "protobuf field {number} claims {len} bytes, {} remain", self.0.len());
                    }
                    let (head, rest) = self.0.split_at(len as usize);
                    self.0 = rest;
                    Value::Bytes(head)
                }
                other => bail!(ModelFormat, "unsupported protobuf wire type {other} (field {number})"),
            };
            Ok((number, value))
        })();
        if result.is_err() {
            self.0 = &[];
        }
        Some(result)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal protobuf writer for building test models.
    pub(crate) fn field_varint(out: &mut Vec<u8>, number: u64, mut v: u64) {
        put_varint(out, number << 3);
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
    }

    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub(crate) fn field_bytes(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
        put_varint(out, (number << 3) | 2);
        put_varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }

    /// A ValueInfoProto: `dims` entries < 0 become symbolic dimensions.
    pub(crate) fn value_info(name: &str, elem_type: u64, dims: &[i64]) -> Vec<u8> {
        let mut shape = Vec::new();
        for (i, &d) in dims.iter().enumerate() {
            let mut dim = Vec::new();
            if d >= 0 {
                field_varint(&mut dim, 1, d as u64);
            } else {
                field_bytes(&mut dim, 2, format!("dim_{i}").as_bytes());
            }
            field_bytes(&mut shape, 1, &dim);
        }
        let mut tensor = Vec::new();
        field_varint(&mut tensor, 1, elem_type);
        field_bytes(&mut tensor, 2, &shape);
        let mut type_proto = Vec::new();
        field_bytes(&mut type_proto, 1, &tensor);
        let mut info = Vec::new();
        field_bytes(&mut info, 1, name.as_bytes());
        field_bytes(&mut info, 2, &type_proto);
        info
    }

    pub(crate) fn node(name: &str, op: &str, output: &str) -> Vec<u8> {
        let mut n = Vec::new();
        field_bytes(&mut n, 1, b"x");
        field_bytes(&mut n, 2, output.as_bytes());
        if !name.is_empty() {
            field_bytes(&mut n, 3, name.as_bytes());
        }
        field_bytes(&mut n, 4, op.as_bytes());
        n
    }

    /// A ModelProto with these inputs, outputs and nodes (and one initializer also listed as an
    /// input, as old exporters did).
    pub(crate) fn model(opset: u64, inputs: &[Vec<u8>], outputs: &[Vec<u8>], nodes: &[Vec<u8>]) -> Vec<u8> {
        let mut graph = Vec::new();
        for n in nodes {
            field_bytes(&mut graph, 1, n);
        }
        field_bytes(&mut graph, 2, b"main_graph");
        let mut init = Vec::new();
        field_varint(&mut init, 1, 4);
        field_varint(&mut init, 2, 1);
        field_bytes(&mut init, 8, b"wte.weight");
        field_bytes(&mut init, 9, &[0u8; 16]);
        field_bytes(&mut graph, 5, &init);
        for i in inputs {
            field_bytes(&mut graph, 11, i);
        }
        field_bytes(&mut graph, 11, &value_info("wte.weight", 1, &[4]));
        for o in outputs {
            field_bytes(&mut graph, 12, o);
        }
        let mut m = Vec::new();
        field_varint(&mut m, 1, 8);
        field_bytes(&mut m, 2, b"pytorch");
        field_bytes(&mut m, 7, &graph);
        let mut op = Vec::new();
        field_bytes(&mut op, 1, b"");
        field_varint(&mut op, 2, opset);
        field_bytes(&mut m, 8, &op);
        let mut ms = Vec::new();
        field_bytes(&mut ms, 1, b"com.microsoft");
        field_varint(&mut ms, 2, 1);
        field_bytes(&mut m, 8, &ms);
        m
    }

    #[test]
    fn reads_inputs_outputs_nodes_and_opset() {
        let bytes = model(
            17,
            &[value_info("input_ids", 7, &[-1, -1]), value_info("past_key_values.0.key", 10, &[-1, 12, -1, 64])],
            &[value_info("logits", 1, &[-1, -1, 50257])],
            &[
                node("/h.0/ln_1/LayerNormalization", "LayerNormalization", "ln1"),
                node("", "LayerNormalization", "ln_f_out"),
            ],
        );
        let m = OnnxModel::parse(&bytes).unwrap();
        assert_eq!(m.opset, Some(17));
        assert_eq!(m.inputs.len(), 2, "the initializer listed as an input is not a real input");
        let past = m.input("past_key_values.0.key").unwrap();
        assert_eq!(past.elem_type, ElemType::F16);
        assert_eq!(
            past.dims,
            vec![Dim::Named("dim_0".into()), Dim::Fixed(12), Dim::Named("dim_2".into()), Dim::Fixed(64)]
        );
        assert_eq!(m.outputs[0].dims[2], Dim::Fixed(50257));
        assert_eq!(m.nodes[0].name, "/h.0/ln_1/LayerNormalization");
        assert_eq!(m.nodes[1].outputs, vec!["ln_f_out".to_string()]);
    }

    #[test]
    fn corrupt_bytes_fail_cleanly() {
        let bytes = model(17, &[value_info("input_ids", 7, &[-1, -1])], &[], &[]);
        for cut in [1, 5, bytes.len() / 2, bytes.len() - 1] {
            let e = OnnxModel::parse(&bytes[..cut]).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::ModelFormat, "cut at {cut}: {e}");
        }
        assert!(OnnxModel::parse(&[0xff; 12]).is_err());
        assert!(OnnxModel::parse(b"").unwrap_err().message().contains("no graph"));
        // Wire type 3 (groups) is not used by ONNX.
        assert!(OnnxModel::parse(&[0x0b]).unwrap_err().message().contains("wire type 3"));
    }

    #[test]
    fn a_missing_file_is_file_not_found() {
        let e = OnnxModel::read(Path::new("/nonexistent/model.onnx")).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::FileNotFound);
    }
}
