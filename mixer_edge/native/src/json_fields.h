// Reading a JSON file of the artifact field by field, as the Python runtime's pydantic schemas do: the helpers
// wgpu_engine.cc's program.json reader and cuda_engine.cc's cuda_plan.json reader share. Every refusal is one
// line, "<file>: field '<a.b.0>': <what>, got <value>: rebuild the artifact".
#ifndef MIXER_EDGE_JSON_FIELDS_H_
#define MIXER_EDGE_JSON_FIELDS_H_

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <mbedtls/base64.h>
#include <nlohmann/json.hpp>

#include "engine.h"

namespace mixer_edge {

// Bytes per element of the numpy dtypes a program, a plan or params.npz may name (0: none of them).
inline int itemsize(const std::string& dtype) {
  static const std::map<std::string, int> sizes = {
      {"float16", 2}, {"float32", 4}, {"float64", 8}, {"int8", 1},  {"uint8", 1},  {"int16", 2},
      {"uint16", 2},  {"int32", 4},   {"uint32", 4},  {"int64", 8}, {"uint64", 8}, {"bool", 1}};
  auto it = sizes.find(dtype);
  return it == sizes.end() ? 0 : it->second;
}

// The product of `shape` times `scale`, saturated at 2^62 (numpy's would wrap; both are refused as too big).
inline int64_t elements(const std::vector<int64_t>& shape, int64_t scale = 1) {
  constexpr int64_t cap = int64_t{1} << 62;
  int64_t n = scale;
  for (int64_t dim : shape) n = (dim != 0 && n > cap / dim) ? cap : n * dim;
  return std::min(n, cap);
}

inline std::string list_text(const std::vector<int64_t>& values) {  // as Python prints a list: [1, 2]
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

// `read(doc)` of the JSON document in `path`: a file that cannot be read or parsed is refused in one line, and
// so is a type `read`'s checks missed (never a crash).
template <typename Json, typename Read>
auto read_json(const std::string& path, Read read) {
  std::ifstream file(path, std::ios::binary);
  std::string content;
  if (file) content.assign(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
  if (!file.is_open() || file.bad())
    fail(MIXER_EDGE_BAD_ARTIFACT, path + " could not be read (" + std::strerror(errno) + "): copy the artifact again");
  Json doc;
  try {
    doc = Json::parse(content);
  } catch (const typename Json::exception& exc) {
    fail(MIXER_EDGE_BAD_ARTIFACT,
         path + " is not valid JSON (" + safe_text(exc.what(), 120) + "): rebuild the artifact");
  }
  try {
    return read(doc);
  } catch (const typename Json::exception& exc) {
    fail(MIXER_EDGE_BAD_ARTIFACT, path + ": " + safe_text(exc.what(), 120) + ": rebuild the artifact");
  }
}

// The checks of one JSON file (`source`, named in every message), for a reader to build on. Json is
// nlohmann::json or nlohmann::ordered_json: the order an object's unknown keys are found in is the reader's.
template <typename Json>
class JsonFields {
 public:
  static constexpr int64_t kMaxDimension = (int64_t{1} << 31) - 1;  // both schemas' shapes: le=2**31 - 1

  explicit JsonFields(std::string source) : source_(std::move(source)) {}

  const std::string& source() const { return source_; }

  [[noreturn]] void refuse(const std::string& what) const {
    fail(MIXER_EDGE_BAD_ARTIFACT, source_ + ": " + what + ": rebuild the artifact");
  }

  // The field's problem, and the value found there when it is short.
  [[noreturn]] void bad(const std::string& field, const std::string& what, const Json* got = nullptr) const {
    std::string shown;
    auto primitive = [](const Json& item) { return item.is_primitive(); };
    bool flat = got && (got->is_primitive() || (got->is_array() && std::all_of(got->begin(), got->end(), primitive)));
    if (flat)  // nested values are not printed: dump() recurses
      shown = ", got " + safe_text(got->dump(-1, ' ', false, Json::error_handler_t::replace), 60);
    else if (got)
      shown = got->is_array() ? ", got a list" : ", got an object";
    refuse((field.empty() ? "" : "field '" + safe_text(field, 80) + "': ") + what + shown);
  }

  static std::string at(const std::string& field, const std::string& key) {
    return field.empty() ? key : field + "." + key;
  }

  // An object with exactly these keys (`optional` may be absent).
  void record(const Json& j, const std::string& field, const std::vector<std::string>& required,
              const std::vector<std::string>& optional = {}) const {
    if (!j.is_object()) bad(field, "should be an object", &j);
    std::set<std::string> known(required.begin(), required.end());
    known.insert(optional.begin(), optional.end());
    for (const auto& item : j.items()) {
      if (known.count(item.key())) continue;
      std::string names;
      for (const std::string& name : known) names += (names.empty() ? "" : ", ") + name;
      refuse("unknown field '" + safe_text(item.key(), 60) + "'" + (field.empty() ? "" : " in [" + field + "]") +
             " (known: " + names + ")");
    }
    for (const std::string& key : required)
      if (!j.contains(key)) refuse("missing field '" + at(field, key) + "'");
  }

  int64_t integer(const Json& j, const std::string& field, int64_t lo, int64_t hi) const {
    if (!j.is_number_integer()) bad(field, "should be an integer", &j);
    bool fits = j.is_number_unsigned() ? j.template get<uint64_t>() <= static_cast<uint64_t>(hi) &&
                                             (lo <= 0 || j.template get<uint64_t>() >= static_cast<uint64_t>(lo))
                                       : j.template get<int64_t>() >= lo && j.template get<int64_t>() <= hi;
    if (!fits) bad(field, "should be an integer from " + std::to_string(lo) + " to " + std::to_string(hi), &j);
    return j.template get<int64_t>();
  }

  const Json& array(const Json& j, const std::string& field) const {
    if (!j.is_array()) bad(field, "should be a list", &j);
    return j;
  }

  std::vector<int64_t> integers(const Json& j, const std::string& field, int64_t lo, int64_t hi) const {
    std::vector<int64_t> out;
    for (size_t i = 0; i < array(j, field).size(); ++i)
      out.push_back(integer(j[i], at(field, std::to_string(i)), lo, hi));
    return out;
  }

  std::vector<int64_t> shape(const Json& j, const std::string& field) const {
    if (array(j, field).size() > 16) bad(field, "should hold at most 16 dimensions", &j);
    return integers(j, field, 0, kMaxDimension);
  }

  std::string string(const Json& j, const std::string& field) const {
    if (!j.is_string()) bad(field, "should be a string", &j);
    return j.template get<std::string>();
  }

  static bool identifier(const std::string& name) {  // ^[A-Za-z_][A-Za-z0-9_]*$ (vulkan.IDENTIFIER)
    auto word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
    return !name.empty() && !std::isdigit(static_cast<unsigned char>(name[0])) &&
           std::all_of(name.begin(), name.end(), word);
  }

  // A constant's bytes: `data` decoded, checked against its dtype and shape, finite numbers only
  // (ConstantStep.array). The dtype is one itemsize() knows.
  std::vector<uint8_t> constant(const std::string& data, const std::string& dtype, const std::vector<int64_t>& shape,
                                const std::string& field) const {
    Json shown = data.substr(0, 40);
    // As base64.b64decode(validate=True): only the alphabet, then at most two '=', in whole quartets.
    size_t body = data.find_last_not_of('=') + 1;  // 0 where all are '='
    auto digit = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '+' || c == '/'; };
    std::vector<uint8_t> raw(data.size() / 4 * 3 + 1);
    size_t n = 0;
    if (data.size() % 4 || data.size() - body > 2 || !std::all_of(data.begin(), data.begin() + body, digit) ||
        mbedtls_base64_decode(raw.data(), raw.size(), &n, reinterpret_cast<const unsigned char*>(data.data()),
                              data.size()))
      bad(field, "is not base64", &shown);
    raw.resize(n);
    int64_t size = elements(shape, itemsize(dtype));
    if (static_cast<int64_t>(n) != size)
      bad(field, "holds " + std::to_string(n) + " bytes, but " + dtype + list_text(shape) + " is " +
                     std::to_string(size), &shown);
    const int width = itemsize(dtype);
    for (size_t i = 0; dtype[0] == 'f' && i < n; i += width) {  // little-endian floats
      bool finite;
      if (width == 2) {
        finite = (raw[i + 1] & 0x7c) != 0x7c;  // float16: an exponent of all ones is Inf or NaN
      } else if (width == 4) {
        float value;
        std::memcpy(&value, &raw[i], 4);
        finite = std::isfinite(value);
      } else {
        double value;
        std::memcpy(&value, &raw[i], 8);
        finite = std::isfinite(value);
      }
      if (!finite) bad(field, "holds NaN or Inf", &shown);
    }
    return raw;
  }

 private:
  std::string source_;
};

}  // namespace mixer_edge

#endif  // MIXER_EDGE_JSON_FIELDS_H_
