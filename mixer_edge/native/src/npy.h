// numpy's .npy format (version 1-3, little-endian numbers, C order): read from memory, written to a file.
#ifndef MIXER_EDGE_NPY_H_
#define MIXER_EDGE_NPY_H_

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace mixer_edge {
namespace npy {

struct View {
  std::string dtype;  // "float32", "int8", "bool", ...
  std::vector<int64_t> shape;
  const uint8_t* data;
  uint64_t nbytes;
};

inline size_t itemsize(const std::string& dtype) {
  if (dtype == "int8" || dtype == "uint8" || dtype == "bool") return 1;
  if (dtype == "float16" || dtype == "int16" || dtype == "uint16") return 2;
  if (dtype == "float32" || dtype == "int32" || dtype == "uint32") return 4;
  return 8;
}

// The array in `size` bytes at `p`; std::runtime_error (a short reason naming `name`) for anything else:
// objects (pickles), strings, big-endian or Fortran-order data, a size that does not match the header.
inline View parse(const std::string& name, const uint8_t* p, uint64_t size) {
  static const std::map<std::string, std::string> names = {
      {"<f4", "float32"}, {"<f2", "float16"}, {"<f8", "float64"}, {"|i1", "int8"},   {"|u1", "uint8"},
      {"<i2", "int16"},   {"<u2", "uint16"},  {"<i4", "int32"},   {"<u4", "uint32"}, {"<i8", "int64"},
      {"<u8", "uint64"},  {"|b1", "bool"}};
  if (size < 10 || std::memcmp(p, "\x93NUMPY", 6) != 0) throw std::runtime_error("'" + name + "' is not a .npy array");
  const bool v1 = p[6] == 1;
  const uint64_t header_len = v1 ? p[8] | p[9] << 8 : p[8] | p[9] << 8 | p[10] << 16 | uint64_t(p[11]) << 24;
  const uint64_t start = v1 ? 10 : 12;
  if (start + header_len > size) throw std::runtime_error("'" + name + "' has a cut header");
  // The header is a Python dict literal: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
  const std::string header(reinterpret_cast<const char*>(p + start), header_len);
  auto field = [&](const std::string& key) {
    const size_t at = header.find("'" + key + "':");
    if (at == std::string::npos) throw std::runtime_error("'" + name + "' has no " + key);
    return header.substr(at + key.size() + 3);
  };
  std::string descr = field("descr");
  descr = descr.substr(descr.find('\'') + 1);
  descr = descr.substr(0, descr.find('\''));
  const auto known = names.find(descr);
  if (known == names.end()) throw std::runtime_error("array '" + name + "' has dtype " + descr + ", not a number array");
  if (field("fortran_order").rfind(" True", 0) == 0) throw std::runtime_error("array '" + name + "' is in Fortran order");
  View view{known->second, {}, nullptr, 0};
  std::string shape = field("shape");
  shape = shape.substr(shape.find('(') + 1, shape.find(')') - shape.find('(') - 1);
  std::stringstream dims(shape);
  std::string dim;
  uint64_t elements = 1;
  while (std::getline(dims, dim, ',')) {
    if (dim.find_first_not_of(' ') == std::string::npos) continue;
    const long long d = std::stoll(dim);
    if (d < 0 || d > (1LL << 40)) throw std::runtime_error("array '" + name + "' has a bad shape");
    view.shape.push_back(d);
    elements *= static_cast<uint64_t>(d);
  }
  view.nbytes = elements * itemsize(view.dtype);
  if (start + header_len + view.nbytes != size) throw std::runtime_error("array '" + name + "' has the wrong size");
  view.data = p + start + header_len;
  return view;
}

// Writes a float32 array as version-1 .npy; false if the file cannot be written.
inline bool write_float32(const std::string& path, const std::vector<int64_t>& shape, const float* data) {
  std::string dims;
  uint64_t elements = 1;
  for (int64_t d : shape) dims += std::to_string(d) + ",", elements *= d;
  if (shape.size() > 1) dims.pop_back();
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims + "), }";
  header += std::string(63 - (10 + header.size()) % 64, ' ') + "\n";  // the data starts 64-byte aligned
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) return false;
  const unsigned char preamble[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, static_cast<unsigned char>(header.size() & 255),
                                      static_cast<unsigned char>(header.size() >> 8)};
  bool ok = std::fwrite(preamble, 1, 10, f) == 10 && std::fwrite(header.data(), 1, header.size(), f) == header.size() &&
            std::fwrite(data, sizeof(float), elements, f) == elements;
  return std::fclose(f) == 0 && ok;
}

}  // namespace npy
}  // namespace mixer_edge

#endif  // MIXER_EDGE_NPY_H_
