//! A small builder of ONNX graphs over the protobuf messages of `onnx-protobuf`:
//! nodes with generated value names, float32 initialisers, typed inputs and
//! outputs.

use onnx_protobuf::attribute_proto::AttributeType;
use onnx_protobuf::tensor_proto::DataType;
use onnx_protobuf::tensor_shape_proto::{dimension, Dimension};
use onnx_protobuf::type_proto::{self, Value};
use onnx_protobuf::{AttributeProto, GraphProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto};
use protobuf::{EnumOrUnknown, MessageField};

/// One attribute of a node.
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
}

/// A dimension of a graph input or output: fixed, or named and dynamic.
pub enum Dim {
    Fixed(usize),
    Dynamic(&'static str),
}

/// Nodes and initialisers in the order they are added (a topological order, as
/// ONNX asks, since every node is added after its inputs).
#[derive(Default)]
pub struct GraphBuilder {
    graph: GraphProto,
}

impl GraphBuilder {
    /// A float32 constant `name` of `dims`, stored little-endian in `raw_data`.
    pub fn initializer(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        assert_eq!(
            dims.iter().product::<usize>(),
            values.len(),
            "{name}: shape and data agree"
        );
        let tensor = TensorProto {
            name: name.to_string(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::FLOAT as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        };
        self.graph.initializer.push(tensor);
        name.to_string()
    }

    /// An int64 constant (shapes, axes, split sizes).
    pub fn int_initializer(&mut self, name: &str, values: &[i64]) -> String {
        let tensor = TensorProto {
            name: name.to_string(),
            dims: vec![values.len() as i64],
            data_type: DataType::INT64 as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        };
        self.graph.initializer.push(tensor);
        name.to_string()
    }

    /// Adds a node `op` named `name` with `outputs` fresh values; returns their names.
    pub fn node_n(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attrs: &[(&str, Attr)],
        outputs: usize,
    ) -> Vec<String> {
        let outs: Vec<String> = (0..outputs)
            .map(|i| {
                if outputs == 1 {
                    format!("{name}:out")
                } else {
                    format!("{name}:out{i}")
                }
            })
            .collect();
        let node = NodeProto {
            name: name.to_string(),
            op_type: op.to_string(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outs.clone(),
            attribute: attrs.iter().map(|(k, v)| attribute(k, v)).collect(),
            ..Default::default()
        };
        self.graph.node.push(node);
        outs
    }

    /// Adds a node with one output; returns its name.
    pub fn node(&mut self, op: &str, name: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        self.node_n(op, name, inputs, attrs, 1).remove(0)
    }

    /// Renames the value `from` (the output of the last node that made it) to `to`,
    /// for the graph's named outputs.
    pub fn rename_output(&mut self, from: &str, to: &str) {
        for node in self.graph.node.iter_mut().rev() {
            if let Some(o) = node.output.iter_mut().find(|o| *o == from) {
                *o = to.to_string();
                return;
            }
        }
        panic!("no node makes {from}");
    }

    /// Declares a float32 graph input.
    pub fn input(&mut self, name: &str, dims: &[Dim]) {
        self.graph.input.push(value_info(name, dims));
    }

    /// Declares a float32 graph output.
    pub fn output(&mut self, name: &str, dims: &[Dim]) {
        self.graph.output.push(value_info(name, dims));
    }

    /// The finished graph, named `name`.
    pub fn finish(mut self, name: &str) -> GraphProto {
        self.graph.name = name.to_string();
        self.graph
    }
}

fn attribute(name: &str, value: &Attr) -> AttributeProto {
    let mut a = AttributeProto {
        name: name.to_string(),
        ..Default::default()
    };
    let kind = match value {
        Attr::Int(v) => {
            a.i = *v;
            AttributeType::INT
        }
        Attr::Ints(v) => {
            a.ints = v.clone();
            AttributeType::INTS
        }
    };
    a.type_ = EnumOrUnknown::new(kind);
    a
}

fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
                Dim::Dynamic(p) => dimension::Value::DimParam(p.to_string()),
            }),
            ..Default::default()
        })
        .collect();
    let tensor = type_proto::Tensor {
        elem_type: DataType::FLOAT as i32,
        shape: MessageField::some(TensorShapeProto {
            dim,
            ..Default::default()
        }),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.to_string(),
        type_: MessageField::some(TypeProto {
            value: Some(Value::TensorType(tensor)),
            ..Default::default()
        }),
        ..Default::default()
    }
}
