//! Proto3 JSON straight to the protobuf wire format, for the resources of a large
//! file: a resource text becomes its `Any` in one pass over the text, with no
//! dynamic message in between and no message encoded twice.
//!
//! The reference decoder stays prost-reflect's (`decode::message_from_text_in`).
//! This one takes the part of the JSON mapping a configuration file uses, and
//! decodes it as the reference does: field names as `jsonName` or as declared, the
//! scalars (numbers, or decimal strings for the integers), enum names and numbers,
//! nested messages and `Any`s (those of types the pool lacks carried opaquely, as
//! the reference carries them), lists, maps, and the well-known types
//! `Duration`, `Struct`, `Value`, `ListValue`, `Empty` and the wrappers. Anything
//! else, and everything the reference would refuse or take leniently, makes it
//! give up ([`any`] returns `None`) and the caller decodes that resource with the
//! reference: a key given twice, two members of one oneof, a `null`, an unknown
//! field or enum name, an `Any` whose `@type` is not its first key, a resource of
//! a type the pool lacks, `bytes`, a `Timestamp` or a `FieldMask`, an integer
//! written as a fraction. Errors and unknown fields are so always the reference
//! decoder's to report.
//!
//! Each message is written once: its length is a one-byte placeholder, widened in
//! place when the body turns out longer (the bytes after it move once per level,
//! which costs less than computing each nested length first).

use std::{collections::HashMap, fmt, str::FromStr};

use prost_reflect::{DescriptorPool, FieldDescriptor, MessageDescriptor};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use sockmesh_proto::pb::google::protobuf::Any;

use super::opaque::OpaqueTypes;

type Names<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// Decodes one resource text (a JSON object with its `@type`) as the `Any` the
/// reference decoder would make of it, and adds the nested `Any`s it carries
/// opaquely to `opaque`; `None` (and nothing added) when the text is outside what
/// this decoder takes (the reference then decodes it, and reports what is wrong).
pub fn any(schema: &mut Schema<'_>, text: &str, opaque: &mut OpaqueTypes) -> Option<Any> {
    schema.opaque.clear();
    let mut de = serde_json::Deserializer::from_str(text);
    // Written into the schema's buffer, then copied once at its size: the
    // resources live as long as the state takes to read them, and a buffer grown
    // in steps would hold up to twice the bytes.
    let mut out = std::mem::take(&mut schema.scratch);
    out.clear();
    let type_url = de.deserialize_map(AnyBody {
        s: schema,
        out: &mut out,
        nested: false,
    });
    let read = type_url.ok().filter(|_| de.end().is_ok());
    let value = out.as_slice().to_vec();
    schema.scratch = out;
    let type_url = read?;
    for (url, n) in std::mem::take(&mut schema.opaque) {
        *opaque.entry(url).or_default() += n;
    }
    Some(Any { type_url, value })
}

/// Checks this decoder's contract on one resource text: where [`any`] returns a
/// resource, the reference decoder accepts the text, notes no unknown field and
/// the same opaque types, and gives the same message. Messages are compared as
/// canonical JSON (nested `Any`s decoded, defaults left out), so that two
/// encodings of one message compare equal. `Err`: how the two disagree. For
/// tests over real configurations.
pub fn check_against_reference(text: &str) -> Result<Taken, String> {
    use prost::Message as _;
    let pool = sockmesh_proto::descriptor_pool();
    let mut opaque = OpaqueTypes::new();
    let fast = any(&mut Schema::new(pool), text, &mut opaque);
    let doc = format!("{{\"resources\":[{text}]}}");
    let reference = super::decode::message_from_text_in::<
        sockmesh_proto::pb::envoy::service::discovery::v3::DiscoveryResponse,
    >(pool, "envoy.service.discovery.v3.DiscoveryResponse", &doc);
    let Some(fast) = fast else {
        return Ok(match reference {
            Ok((_, notes)) if notes.unknown_fields.is_empty() => Taken::ReferenceClean,
            _ => Taken::ReferenceNotes,
        });
    };
    let (resp, notes) =
        reference.map_err(|e| format!("taken here, refused by the reference: {e}"))?;
    if !notes.unknown_fields.is_empty() {
        return Err("taken here, the reference notes unknown fields".into());
    }
    if notes.opaque != opaque {
        return Err(format!(
            "opaque types: {opaque:?} here, {:?} by the reference",
            notes.opaque
        ));
    }
    let [reference] = &resp.resources[..] else {
        return Err(format!(
            "the reference read {} resources",
            resp.resources.len()
        ));
    };
    // Opaque `Any`s read back as the empty messages the reference registers.
    let types = opaque.keys().cloned().collect();
    let pool = &super::opaque::pool_with_placeholders(pool, &types).map_err(|e| e.to_string())?;
    let canonical = |resource: &Any| {
        let desc = pool
            .get_message_by_name("google.protobuf.Any")
            .ok_or("no google.protobuf.Any in the pool")?;
        let m = prost_reflect::DynamicMessage::decode(desc, resource.encode_to_vec().as_slice())
            .map_err(|e| e.to_string())?;
        serde_json::to_value(&m).map_err(|e| format!("{resource:?} does not read back: {e}"))
    };
    let (f, r) = (canonical(&fast)?, canonical(reference)?);
    if fast.type_url != reference.type_url || f != r {
        return Err(format!("this decoder: {f}\nthe reference: {r}"));
    }
    Ok(Taken::Here)
}

/// Which decoder decodes a text, as [`check_against_reference`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taken {
    /// This one, with the reference's result.
    Here,
    /// The reference, which refuses the text or notes unknown fields in it.
    ReferenceNotes,
    /// The reference, which accepts the text with no unknown field: a shape this
    /// decoder leaves to it.
    ReferenceClean,
}

/// The message types met so far, compiled from a descriptor pool as they are met:
/// each field by its JSON and declared names, with what its value is. One per
/// thread that decodes.
pub struct Schema<'p> {
    pool: &'p DescriptorPool,
    messages: Vec<Message>,
    message_ids: Names<u32>,
    enums: Vec<Names<i32>>,
    enum_ids: Names<u32>,
    /// The encoding of the resource being decoded.
    scratch: Vec<u8>,
    /// The opaque `Any`s of the resource being decoded.
    opaque: OpaqueTypes,
    /// Type URLs the pool lacks, by whether the reference can carry them (it
    /// registers an empty message of that name, which a malformed name or one
    /// that clashes with the pool's refuses).
    placeholders: Names<bool>,
}

struct Message {
    desc: MessageDescriptor,
    special: Special,
    /// Compiled at the first object of this type.
    fields: Option<Fields>,
}

struct Fields {
    list: Vec<Field>,
    by_name: Names<u16>,
}

/// Message types whose JSON is not an object of their fields.
#[derive(Clone, Copy, PartialEq)]
enum Special {
    Plain,
    Any,
    Duration,
    Struct,
    Value,
    ListValue,
    Empty,
    /// A wrapper: the JSON is its `value` field's.
    Wrapper(Kind),
    /// `Timestamp`, `FieldMask`, `BytesValue`: left to the reference.
    Unsupported,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Double,
    Float,
    Int32,
    Int64,
    Uint32,
    Uint64,
    Sint32,
    Sint64,
    Fixed32,
    Fixed64,
    Sfixed32,
    Sfixed64,
    Bool,
    String,
    /// Left to the reference (base64 has two alphabets and optional padding).
    Bytes,
    Enum(u32),
    /// `google.protobuf.NullValue`: left to the reference.
    NullValue,
    Message(u32),
}

#[derive(Clone, Copy)]
enum Shape {
    Single,
    List,
    /// A map: the entry's key and value kinds.
    Map(Kind, Kind),
}

#[derive(Clone, Copy)]
struct Field {
    /// Position in the message's fields (for the duplicate check).
    index: u16,
    number: u32,
    kind: Kind,
    shape: Shape,
    /// The containing oneof's index, if any.
    oneof: Option<u16>,
}

impl<'p> Schema<'p> {
    pub fn new(pool: &'p DescriptorPool) -> Self {
        Schema {
            pool,
            messages: Vec::new(),
            message_ids: Names::default(),
            enums: Vec::new(),
            enum_ids: Names::default(),
            scratch: Vec::new(),
            opaque: OpaqueTypes::new(),
            placeholders: Names::default(),
        }
    }

    fn placeholder_ok(&mut self, type_url: &str) -> bool {
        if let Some(ok) = self.placeholders.get(type_url) {
            return *ok;
        }
        let one = std::iter::once(type_url.to_owned()).collect();
        let ok = super::opaque::pool_with_placeholders(self.pool, &one).is_ok();
        self.placeholders.insert(type_url.into(), ok);
        ok
    }

    /// The id of the message type `full_name`, if the pool has it.
    fn message_id(&mut self, full_name: &str) -> Option<u32> {
        if let Some(id) = self.message_ids.get(full_name) {
            return Some(*id);
        }
        let desc = self.pool.get_message_by_name(full_name)?;
        Some(self.add_message(desc))
    }

    fn add_message(&mut self, desc: MessageDescriptor) -> u32 {
        if let Some(id) = self.message_ids.get(desc.full_name()) {
            return *id;
        }
        let id = self.messages.len() as u32;
        self.message_ids.insert(desc.full_name().into(), id);
        self.messages.push(Message {
            special: special(desc.full_name()),
            desc,
            fields: None,
        });
        id
    }

    fn enum_id(&mut self, desc: &prost_reflect::EnumDescriptor) -> u32 {
        if let Some(id) = self.enum_ids.get(desc.full_name()) {
            return *id;
        }
        let id = self.enums.len() as u32;
        self.enum_ids.insert(desc.full_name().into(), id);
        self.enums.push(
            desc.values()
                .map(|v| (v.name().into(), v.number()))
                .collect(),
        );
        id
    }

    fn kind(&mut self, field: &FieldDescriptor) -> Kind {
        use prost_reflect::Kind as K;
        match field.kind() {
            K::Double => Kind::Double,
            K::Float => Kind::Float,
            K::Int32 => Kind::Int32,
            K::Int64 => Kind::Int64,
            K::Uint32 => Kind::Uint32,
            K::Uint64 => Kind::Uint64,
            K::Sint32 => Kind::Sint32,
            K::Sint64 => Kind::Sint64,
            K::Fixed32 => Kind::Fixed32,
            K::Fixed64 => Kind::Fixed64,
            K::Sfixed32 => Kind::Sfixed32,
            K::Sfixed64 => Kind::Sfixed64,
            K::Bool => Kind::Bool,
            K::String => Kind::String,
            K::Bytes => Kind::Bytes,
            K::Enum(e) if e.full_name() == "google.protobuf.NullValue" => Kind::NullValue,
            K::Enum(e) => Kind::Enum(self.enum_id(&e)),
            K::Message(m) => Kind::Message(self.add_message(m)),
        }
    }

    /// The field of message `id` that a JSON key names (its JSON name first, as
    /// the reference looks it up).
    fn field(&mut self, id: u32, key: &str) -> Option<Field> {
        let message = self.messages.get(id as usize)?;
        if message.fields.is_none() {
            let desc = message.desc.clone();
            let fields = self.compile(&desc);
            self.messages.get_mut(id as usize)?.fields = Some(fields);
        }
        let fields = self.messages.get(id as usize)?.fields.as_ref()?;
        let index = *fields.by_name.get(key)?;
        fields.list.get(usize::from(index)).copied()
    }

    fn compile(&mut self, desc: &MessageDescriptor) -> Fields {
        let mut list = Vec::with_capacity(desc.fields().len());
        let mut by_name = Names::default();
        let oneofs: Vec<String> = desc.oneofs().map(|o| o.name().to_owned()).collect();
        for (i, f) in desc.fields().enumerate() {
            let index = u16::try_from(i).unwrap_or(u16::MAX);
            let shape = if f.is_map() {
                // A map's kind is its entry message (a pool that decoded has one).
                let entry = f.kind().as_message().cloned();
                entry.map_or(Shape::Map(Kind::Bytes, Kind::Bytes), |entry| {
                    let key = self.kind(&entry.map_entry_key_field());
                    let value = self.kind(&entry.map_entry_value_field());
                    Shape::Map(key, value)
                })
            } else if f.is_list() {
                Shape::List
            } else {
                Shape::Single
            };
            list.push(Field {
                index,
                number: f.number(),
                kind: self.kind(&f),
                shape,
                oneof: f.containing_oneof().map(|o| {
                    let at = oneofs.iter().position(|n| n == o.name());
                    at.and_then(|i| u16::try_from(i).ok()).unwrap_or(u16::MAX)
                }),
            });
            by_name.insert(f.json_name().into(), index);
        }
        for (i, f) in desc.fields().enumerate() {
            let index = u16::try_from(i).unwrap_or(u16::MAX);
            by_name.entry(f.name().into()).or_insert(index);
        }
        Fields { list, by_name }
    }

    fn special(&self, id: u32) -> Special {
        self.messages
            .get(id as usize)
            .map_or(Special::Unsupported, |m| m.special)
    }
}

fn special(full_name: &str) -> Special {
    match full_name {
        "google.protobuf.Any" => Special::Any,
        "google.protobuf.Duration" => Special::Duration,
        "google.protobuf.Struct" => Special::Struct,
        "google.protobuf.Value" => Special::Value,
        "google.protobuf.ListValue" => Special::ListValue,
        "google.protobuf.Empty" => Special::Empty,
        "google.protobuf.DoubleValue" => Special::Wrapper(Kind::Double),
        "google.protobuf.FloatValue" => Special::Wrapper(Kind::Float),
        "google.protobuf.Int64Value" => Special::Wrapper(Kind::Int64),
        "google.protobuf.UInt64Value" => Special::Wrapper(Kind::Uint64),
        "google.protobuf.Int32Value" => Special::Wrapper(Kind::Int32),
        "google.protobuf.UInt32Value" => Special::Wrapper(Kind::Uint32),
        "google.protobuf.BoolValue" => Special::Wrapper(Kind::Bool),
        "google.protobuf.StringValue" => Special::Wrapper(Kind::String),
        "google.protobuf.Timestamp"
        | "google.protobuf.FieldMask"
        | "google.protobuf.BytesValue" => Special::Unsupported,
        _ => Special::Plain,
    }
}

/// The error that sends a text to the reference decoder (its message is never
/// shown: the reference's is).
fn outside<E: serde::de::Error>() -> E {
    E::custom("outside the fast JSON decoder")
}

// The wire format.

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, number: u32, wire: u32) {
    varint(out, u64::from(number << 3 | wire));
}

/// Starts a length-delimited field: its tag and a one-byte length placeholder. The
/// body starts at the returned offset.
fn open(out: &mut Vec<u8>, number: u32) -> usize {
    tag(out, number, LEN);
    out.push(0);
    out.len()
}

/// Ends the field [`open`] started: its length, widened in place past 127 bytes.
fn close(out: &mut Vec<u8>, start: usize) {
    let len = out.len() - start;
    if len < 0x80 {
        out[start - 1] = len as u8;
        return;
    }
    let mut prefix = Vec::with_capacity(10);
    varint(&mut prefix, len as u64);
    out.splice(start - 1..start, prefix);
}

fn string(out: &mut Vec<u8>, number: u32, s: &str) {
    tag(out, number, LEN);
    varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A scalar read from JSON, as the reference reads it for its kind.
#[derive(Clone, Copy)]
enum Scalar {
    I32(i32),
    I64(i64),
    U32(u32),
    U64(u64),
    F64(f64),
    F32(f32),
    Bool(bool),
}

fn scalar(out: &mut Vec<u8>, number: u32, kind: Kind, v: Scalar) {
    match (kind, v) {
        (Kind::Int32 | Kind::Enum(_), Scalar::I32(v)) => {
            tag(out, number, VARINT);
            varint(out, i64::from(v) as u64);
        }
        (Kind::Int64, Scalar::I64(v)) => {
            tag(out, number, VARINT);
            varint(out, v as u64);
        }
        (Kind::Uint32, Scalar::U32(v)) => {
            tag(out, number, VARINT);
            varint(out, u64::from(v));
        }
        (Kind::Uint64, Scalar::U64(v)) => {
            tag(out, number, VARINT);
            varint(out, v);
        }
        (Kind::Sint32, Scalar::I32(v)) => {
            tag(out, number, VARINT);
            varint(out, u64::from(((v << 1) ^ (v >> 31)) as u32));
        }
        (Kind::Sint64, Scalar::I64(v)) => {
            tag(out, number, VARINT);
            varint(out, ((v << 1) ^ (v >> 63)) as u64);
        }
        (Kind::Fixed32, Scalar::U32(v)) => {
            tag(out, number, FIXED32);
            out.extend_from_slice(&v.to_le_bytes());
        }
        (Kind::Sfixed32, Scalar::I32(v)) => {
            tag(out, number, FIXED32);
            out.extend_from_slice(&v.to_le_bytes());
        }
        (Kind::Float, Scalar::F32(v)) => {
            tag(out, number, FIXED32);
            out.extend_from_slice(&v.to_le_bytes());
        }
        (Kind::Fixed64, Scalar::U64(v)) => {
            tag(out, number, FIXED64);
            out.extend_from_slice(&v.to_le_bytes());
        }
        (Kind::Sfixed64, Scalar::I64(v)) => {
            tag(out, number, FIXED64);
            out.extend_from_slice(&v.to_le_bytes());
        }
        (Kind::Double, Scalar::F64(v)) => {
            tag(out, number, FIXED64);
            out.extend_from_slice(&v.to_le_bytes());
        }
        (Kind::Bool, Scalar::Bool(v)) => {
            tag(out, number, VARINT);
            out.push(u8::from(v));
        }
        // `read_scalar` reads each kind as its own variant.
        _ => {}
    }
}

/// Reads a scalar of `kind` as the reference's visitors do (prost-reflect's
/// `kind.rs`), except that an integer written as a JSON fraction is left to it.
struct ScalarV<'a> {
    kind: Kind,
    enums: &'a [Names<i32>],
}

impl<'de> Visitor<'de> for ScalarV<'_> {
    type Value = Scalar;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a scalar")
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Scalar, E> {
        match self.kind {
            Kind::Bool => Ok(Scalar::Bool(v)),
            _ => Err(outside()),
        }
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Scalar, E> {
        Ok(match self.kind {
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Enum(_) => {
                Scalar::I32(v.try_into().map_err(|_| outside::<E>())?)
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Scalar::I64(v),
            Kind::Uint32 | Kind::Fixed32 => Scalar::U32(v.try_into().map_err(|_| outside::<E>())?),
            Kind::Uint64 | Kind::Fixed64 => Scalar::U64(v.try_into().map_err(|_| outside::<E>())?),
            Kind::Double => Scalar::F64(v as f64),
            Kind::Float => Scalar::F32(v as f32),
            _ => return Err(outside()),
        })
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Scalar, E> {
        match self.kind {
            Kind::Uint64 | Kind::Fixed64 => Ok(Scalar::U64(v)),
            Kind::Double => Ok(Scalar::F64(v as f64)),
            Kind::Float => Ok(Scalar::F32(v as f32)),
            _ => self.visit_i64(v.try_into().map_err(|_| outside::<E>())?),
        }
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Scalar, E> {
        match self.kind {
            Kind::Double => Ok(Scalar::F64(v)),
            Kind::Float if v >= f64::from(f32::MIN) && v <= f64::from(f32::MAX) => {
                Ok(Scalar::F32(v as f32))
            }
            _ => Err(outside()),
        }
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Scalar, E> {
        fn parse<T: FromStr, E: serde::de::Error>(v: &str) -> Result<T, E> {
            v.parse().map_err(|_| outside())
        }
        let special = |inf: f64| match v {
            "Infinity" => Some(inf),
            "-Infinity" => Some(-inf),
            "NaN" => Some(f64::NAN),
            _ => None,
        };
        Ok(match self.kind {
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Scalar::I32(parse(v)?),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Scalar::I64(parse(v)?),
            Kind::Uint32 | Kind::Fixed32 => Scalar::U32(parse(v)?),
            Kind::Uint64 | Kind::Fixed64 => Scalar::U64(parse(v)?),
            Kind::Double => match f64::from_str(v) {
                Ok(x) => Scalar::F64(x),
                Err(_) => Scalar::F64(special(f64::INFINITY).ok_or_else(outside::<E>)?),
            },
            Kind::Float => match f32::from_str(v) {
                Ok(x) => Scalar::F32(x),
                Err(_) => Scalar::F32(special(f64::INFINITY).ok_or_else(outside::<E>)? as f32),
            },
            Kind::Enum(id) => Scalar::I32(
                *self
                    .enums
                    .get(id as usize)
                    .and_then(|names| names.get(v))
                    .ok_or_else(outside::<E>)?,
            ),
            _ => return Err(outside()),
        })
    }
}

/// Writes field `number`, of `kind`, from the JSON value `d` holds.
fn value<'de, D: Deserializer<'de>>(
    d: D,
    s: &mut Schema<'_>,
    out: &mut Vec<u8>,
    number: u32,
    kind: Kind,
) -> Result<(), D::Error> {
    match kind {
        Kind::String => {
            let v = d.deserialize_str(Str)?;
            string(out, number, &v);
            Ok(())
        }
        Kind::Bytes | Kind::NullValue => Err(outside()),
        Kind::Message(id) => {
            let start = open(out, number);
            message_body(d, s, out, id)?;
            close(out, start);
            Ok(())
        }
        _ => {
            let v = d.deserialize_any(ScalarV {
                kind,
                enums: &s.enums,
            })?;
            scalar(out, number, kind, v);
            Ok(())
        }
    }
}

/// Writes the body of a message of type `id` (no tag or length) from `d`.
fn message_body<'de, D: Deserializer<'de>>(
    d: D,
    s: &mut Schema<'_>,
    out: &mut Vec<u8>,
    id: u32,
) -> Result<(), D::Error> {
    match s.special(id) {
        Special::Plain => d.deserialize_map(Body { s, out, id }),
        Special::Any => {
            let start = open(out, 2);
            let type_url = d.deserialize_map(AnyBody {
                s,
                out,
                nested: true,
            })?;
            if out.len() == start {
                // An empty value (an opaque one's) is left out, as the reference
                // leaves it out: its tag and placeholder go.
                out.truncate(start - 2);
            } else {
                close(out, start);
            }
            string(out, 1, &type_url);
            Ok(())
        }
        Special::Duration => {
            let text = d.deserialize_str(Str)?;
            let v = prost_types::Duration::from_str(&text).map_err(|_| outside::<D::Error>())?;
            if v.seconds.unsigned_abs() > 315_576_000_000 || v.nanos.unsigned_abs() > 999_999_999 {
                return Err(outside());
            }
            scalar(out, 1, Kind::Int64, Scalar::I64(v.seconds));
            scalar(out, 2, Kind::Int32, Scalar::I32(v.nanos));
            Ok(())
        }
        Special::Wrapper(kind) => value(d, s, out, 1, kind),
        Special::Struct => d.deserialize_map(StructV { out }),
        Special::Value => d.deserialize_any(ValueV { out }),
        Special::ListValue => d.deserialize_seq(ListV { out }),
        Special::Empty => d.deserialize_map(EmptyV),
        Special::Unsupported => Err(outside()),
    }
}

/// A JSON string, borrowed from the text when it has no escapes.
struct Str;

impl<'de> Visitor<'de> for Str {
    type Value = std::borrow::Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.to_owned().into())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
}

impl<'de> DeserializeSeed<'de> for Str {
    type Value = std::borrow::Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

/// The fields of a plain message.
struct Body<'a, 'p> {
    s: &'a mut Schema<'p>,
    out: &'a mut Vec<u8>,
    id: u32,
}

impl<'de> Visitor<'de> for Body<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        fields(&mut map, self.s, self.out, self.id)
    }
}

/// Writes the remaining entries of `map` as fields of message `id`.
fn fields<'de, A: MapAccess<'de>>(
    map: &mut A,
    s: &mut Schema<'_>,
    out: &mut Vec<u8>,
    id: u32,
) -> Result<(), A::Error> {
    // Fields and oneofs seen, by index: a repeat is the reference's to judge.
    let mut seen = 0u128;
    let mut oneofs = 0u64;
    while let Some(key) = map.next_key_seed(Str)? {
        let field = s.field(id, &key).ok_or_else(outside::<A::Error>)?;
        let bit = 1u128
            .checked_shl(u32::from(field.index))
            .ok_or_else(outside::<A::Error>)?;
        if seen & bit != 0 {
            return Err(outside());
        }
        seen |= bit;
        if let Some(o) = field.oneof {
            let bit = 1u64
                .checked_shl(u32::from(o))
                .ok_or_else(outside::<A::Error>)?;
            if oneofs & bit != 0 {
                return Err(outside());
            }
            oneofs |= bit;
        }
        map.next_value_seed(FieldSeed { s, out, field })?;
    }
    Ok(())
}

struct FieldSeed<'a, 'p> {
    s: &'a mut Schema<'p>,
    out: &'a mut Vec<u8>,
    field: Field,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        let Field { number, kind, .. } = self.field;
        match self.field.shape {
            Shape::Single => value(d, self.s, self.out, number, kind),
            Shape::List => d.deserialize_seq(ListOf {
                s: self.s,
                out: self.out,
                number,
                kind,
            }),
            Shape::Map(key, value) => d.deserialize_map(MapOf {
                s: self.s,
                out: self.out,
                number,
                key,
                value,
            }),
        }
    }
}

/// A repeated field's elements, each with its tag (unpacked, which a decoder
/// reads as it reads packed ones).
struct ListOf<'a, 'p> {
    s: &'a mut Schema<'p>,
    out: &'a mut Vec<u8>,
    number: u32,
    kind: Kind,
}

impl<'de> Visitor<'de> for ListOf<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Element {
                s: &mut *self.s,
                out: &mut *self.out,
                number: self.number,
                kind: self.kind,
            })?
            .is_some()
        {}
        Ok(())
    }
}

struct Element<'a, 'p> {
    s: &'a mut Schema<'p>,
    out: &'a mut Vec<u8>,
    number: u32,
    kind: Kind,
}

impl<'de> DeserializeSeed<'de> for Element<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        value(d, self.s, self.out, self.number, self.kind)
    }
}

/// A map field: one entry message (key 1, value 2) per JSON key, in the text's
/// order (a decoder keeps the last of a repeated key, as the reference does).
struct MapOf<'a, 'p> {
    s: &'a mut Schema<'p>,
    out: &'a mut Vec<u8>,
    number: u32,
    key: Kind,
    value: Kind,
}

impl<'de> Visitor<'de> for MapOf<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(Str)? {
            let start = open(self.out, self.number);
            match self.key {
                Kind::String => string(self.out, 1, &key),
                Kind::Bool => {
                    let v = bool::from_str(&key).map_err(|_| outside::<A::Error>())?;
                    scalar(self.out, 1, Kind::Bool, Scalar::Bool(v));
                }
                kind => {
                    let v = ScalarV { kind, enums: &[] }.visit_str::<A::Error>(&key)?;
                    scalar(self.out, 1, kind, v);
                }
            }
            map.next_value_seed(Element {
                s: &mut *self.s,
                out: &mut *self.out,
                number: 2,
                kind: self.value,
            })?;
            close(self.out, start);
        }
        Ok(())
    }
}

/// An `Any`: `@type` first, then its message's fields. Writes the message's body
/// and returns the type URL. A nested one of a type the pool lacks is carried
/// opaquely, as the reference carries it (`opaque::scrub_document`): the type URL
/// kept, the contents dropped, the type counted.
struct AnyBody<'a, 'p> {
    s: &'a mut Schema<'p>,
    out: &'a mut Vec<u8>,
    nested: bool,
}

impl<'de> Visitor<'de> for AnyBody<'_, '_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object with @type first")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<String, A::Error> {
        if map.next_key_seed(Str)?.as_deref() != Some("@type") {
            return Err(outside());
        }
        let type_url = map.next_value_seed(Str)?.into_owned();
        let (_, name) = type_url.rsplit_once('/').ok_or_else(outside::<A::Error>)?;
        let Some(id) = self.s.message_id(name) else {
            if !self.nested || !self.s.placeholder_ok(&type_url) {
                return Err(outside());
            }
            // A TypedStruct the pool lacks keeps its own `type_url` (field 1).
            let typed_struct =
                matches!(name, "udpa.type.v1.TypedStruct" | "xds.type.v3.TypedStruct");
            let mut kept = false;
            while let Some(key) = map.next_key_seed(Str)? {
                if typed_struct && key == "type_url" {
                    let value: serde_json::Value = map.next_value()?;
                    match value.as_str() {
                        Some(inner) if !kept => string(self.out, 1, inner),
                        // Twice: the reference keeps the last, if a string.
                        _ if kept => return Err(outside()),
                        _ => {}
                    }
                    kept = true;
                } else {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            *self.s.opaque.entry(type_url.clone()).or_default() += 1;
            return Ok(type_url);
        };
        if self.s.special(id) != Special::Plain {
            return Err(outside());
        }
        fields(&mut map, self.s, self.out, id)?;
        Ok(type_url)
    }
}

/// `google.protobuf.Struct`: map<string, Value> `fields` = 1.
struct StructV<'a> {
    out: &'a mut Vec<u8>,
}

impl<'de> Visitor<'de> for StructV<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(Str)? {
            // The reference scrubs any object whose `@type` the pool lacks, a
            // Struct's too.
            if key == "@type" {
                return Err(outside());
            }
            let entry = open(self.out, 1);
            string(self.out, 1, &key);
            let value = open(self.out, 2);
            map.next_value_seed(ValueSeed {
                out: &mut *self.out,
            })?;
            close(self.out, value);
            close(self.out, entry);
        }
        Ok(())
    }
}

/// `google.protobuf.ListValue`: repeated Value `values` = 1.
struct ListV<'a> {
    out: &'a mut Vec<u8>,
}

impl<'de> Visitor<'de> for ListV<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        loop {
            let start = open(self.out, 1);
            if seq
                .next_element_seed(ValueSeed {
                    out: &mut *self.out,
                })?
                .is_none()
            {
                // No element: take the opened field back.
                self.out.truncate(start - 2);
                return Ok(());
            }
            close(self.out, start);
        }
    }
}

struct ValueSeed<'a> {
    out: &'a mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(ValueV { out: self.out })
    }
}

/// The body of a `google.protobuf.Value`: null_value 1, number_value 2,
/// string_value 3, bool_value 4, struct_value 5, list_value 6.
struct ValueV<'a> {
    out: &'a mut Vec<u8>,
}

impl<'de> Visitor<'de> for ValueV<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        tag(self.out, 1, VARINT);
        self.out.push(0);
        Ok(())
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        scalar(self.out, 4, Kind::Bool, Scalar::Bool(v));
        Ok(())
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        scalar(self.out, 2, Kind::Double, Scalar::F64(v));
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        string(self.out, 3, v);
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let start = open(self.out, 5);
        StructV {
            out: &mut *self.out,
        }
        .visit_map(map)?;
        close(self.out, start);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        let start = open(self.out, 6);
        ListV {
            out: &mut *self.out,
        }
        .visit_seq(seq)?;
        close(self.out, start);
        Ok(())
    }
}

/// `google.protobuf.Empty`: `{}` only.
struct EmptyV;

impl<'de> Visitor<'de> for EmptyV {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("{}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        match map.next_key_seed(Str)? {
            None => Ok(()),
            Some(_) => Err(outside()),
        }
    }
}

#[cfg(test)]
mod tests;
