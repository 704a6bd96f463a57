// Opening an artifact: every check of the Python loader (mixer_edge/runtime.py), in the same order and the
// same words, before any of its code is loaded; and params.npz read without numpy (stored zip + .npy).
#include <sys/auxv.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <mbedtls/sha256.h>
#include <mbedtls/version.h>

#include "engine.h"
#include "npy.h"

#if MBEDTLS_VERSION_MAJOR < 3  // mbedtls 3 dropped the _ret suffix
#define mbedtls_sha256_starts mbedtls_sha256_starts_ret
#define mbedtls_sha256_update mbedtls_sha256_update_ret
#define mbedtls_sha256_finish mbedtls_sha256_finish_ret
#endif

namespace mixer_edge {
namespace {

using json = nlohmann::json;

constexpr const char* kManifest = "manifest.json";
constexpr const char* kParams = "params.npz";
constexpr const char* kLibrary = "model.so";
constexpr const char* kProgram = "program.json";
constexpr const char* kCudaKernels = "kernels.fatbin";
constexpr const char* kCudaPlan = "cuda_plan.json";

[[noreturn]] void bad(const std::string& message) { fail(MIXER_EDGE_BAD_ARTIFACT, message); }

std::string hex(const unsigned char* digest, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    out += digits[digest[i] >> 4];
    out += digits[digest[i] & 15];
  }
  return out;
}

class Sha256 {
 public:
  Sha256() {
    mbedtls_sha256_init(&ctx_);
    mbedtls_sha256_starts(&ctx_, 0);
  }
  ~Sha256() { mbedtls_sha256_free(&ctx_); }
  void update(const void* data, size_t n) { mbedtls_sha256_update(&ctx_, static_cast<const unsigned char*>(data), n); }
  std::string hexdigest() {
    unsigned char digest[32];
    mbedtls_sha256_finish(&ctx_, digest);
    return hex(digest, sizeof digest);
  }

 private:
  mbedtls_sha256_context ctx_;
};

std::string file_sha256(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  Sha256 digest;
  std::vector<char> chunk(1 << 20);
  while (f) {
    f.read(chunk.data(), chunk.size());
    digest.update(chunk.data(), static_cast<size_t>(f.gcount()));
  }
  return digest.hexdigest();
}

// ---- the manifest's digest ------------------------------------------------------------------------
// Python: sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))), ensure_ascii on. Rebuilt through
// the parser's SAX events so every number keeps the text Python wrote (its repr), never re-formatted here.
class CanonicalJson : public nlohmann::json_sax<json> {
 public:
  std::string text;  // the whole document, once parsed

  bool null() override { return value("null"); }
  bool boolean(bool v) override { return value(v ? "true" : "false"); }
  bool number_integer(number_integer_t v) override { return value(std::to_string(v)); }
  bool number_unsigned(number_unsigned_t v) override { return value(std::to_string(v)); }
  bool number_float(number_float_t, const string_t& lexeme) override { return value(lexeme); }
  bool string(string_t& v) override { return value(quoted(v)); }
  bool binary(binary_t&) override { return false; }
  bool start_object(std::size_t) override {
    frames_.push_back(Frame{true, {}, {}, {}});
    return true;
  }
  bool key(string_t& k) override {
    frames_.back().key = k;
    return true;
  }
  bool end_object() override {
    Frame frame = std::move(frames_.back());
    frames_.pop_back();
    std::string out = "{";
    for (const auto& [k, v] : frame.members) {
      if (frames_.empty() && k == "manifest_sha256") continue;  // the digest covers everything but itself
      out += (out.size() > 1 ? "," : "") + quoted(k) + ":" + v;
    }
    return value(out + "}");
  }
  bool start_array(std::size_t) override {
    frames_.push_back(Frame{false, {}, {}, {}});
    return true;
  }
  bool end_array() override {
    Frame frame = std::move(frames_.back());
    frames_.pop_back();
    std::string out = "[";
    for (size_t i = 0; i < frame.items.size(); ++i) out += (i ? "," : "") + frame.items[i];
    return value(out + "]");
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }

 private:
  struct Frame {
    bool object;
    std::string key;
    std::map<std::string, std::string> members;  // sorted by key, as sort_keys (UTF-8 order = code point order)
    std::vector<std::string> items;
  };
  std::vector<Frame> frames_;

  static std::string quoted(const std::string& s) { return json(s).dump(-1, ' ', true); }
  bool value(const std::string& v) {
    if (frames_.empty()) {
      text = v;
    } else if (frames_.back().object) {
      frames_.back().members[frames_.back().key] = v;  // a repeated key: the last wins, as in Python
    } else {
      frames_.back().items.push_back(v);
    }
    return true;
  }
};

// ---- typed reads of the manifest: a missing or mistyped field is named, as the Python schema names it ----
class Fields {
 public:
  Fields(const json& doc, std::string source) : doc_(doc), source_(std::move(source)) {}

  const json& at(const std::string& path) const {
    const json* node = &doc_;
    std::stringstream parts(path);
    std::string part;
    while (std::getline(parts, part, '.')) {
      if (!node->is_object() || !node->contains(part)) bad(source_ + ": missing field '" + path + "': rebuild the artifact");
      node = &(*node)[part];
    }
    return *node;
  }
  [[noreturn]] void wrong(const std::string& path, const std::string& expected) const {
    bad(source_ + ": field '" + path + "': " + expected + ", got " + safe_text(at(path).dump(), 60) +
        ": rebuild the artifact");
  }
  std::string text(const std::string& path) const {
    const json& v = at(path);
    if (!v.is_string()) wrong(path, "Input should be a valid string");
    return v.get<std::string>();
  }
  std::vector<int64_t> dims(const std::string& path, size_t rank) const {
    const json& v = at(path);
    if (!v.is_array() || v.size() != rank) wrong(path, "should be a list of " + std::to_string(rank) + " dimensions");
    std::vector<int64_t> out;
    for (const json& d : v) {
      if (!d.is_number_integer() || d.get<int64_t>() < 1 || d.get<int64_t>() > 2147483647)
        wrong(path, "dimensions are integers from 1 to 2147483647");
      out.push_back(d.get<int64_t>());
    }
    return out;
  }
  std::vector<std::string> texts(const std::string& path) const {
    const json& v = at(path);
    if (!v.is_array()) wrong(path, "Input should be a valid list");
    std::vector<std::string> out;
    for (const json& s : v) {
      if (!s.is_string()) wrong(path, "every item should be a valid string");
      out.push_back(s.get<std::string>());
    }
    return out;
  }
  std::vector<float> numbers(const std::string& path) const {
    const json& v = at(path);
    if (!v.is_array()) wrong(path, "Input should be a valid list");
    std::vector<float> out;
    for (const json& x : v) {
      if (!x.is_number() || !std::isfinite(x.get<double>())) wrong(path, "every item should be a finite number");
      out.push_back(x.get<float>());
    }
    return out;
  }

 private:
  const json& doc_;
  std::string source_;
};

// ---- the device --------------------------------------------------------------------------------------
std::string machine() {
  struct utsname name;
  return uname(&name) == 0 ? name.machine : "unknown";
}

std::string library_arch(const std::string& path) {
  std::vector<uint8_t> header(20);
  std::ifstream f(path, std::ios::binary);
  f.read(reinterpret_cast<char*>(header.data()), 20);
  if (f.gcount() < 20 || std::memcmp(header.data(), "\x7f" "ELF", 4) != 0)
    bad(path + " is not an ELF shared library: rebuild the artifact");
  int e_machine = header[18] | header[19] << 8;
  if (e_machine == 62) return "x86_64";
  if (e_machine == 183) return "aarch64";
  return "ELF machine " + std::to_string(e_machine);
}

// ISA extensions of this CPU by their Linux names: x86 cpuinfo flags, arm64 HWCAP names (getauxval, which
// also tells the truth under qemu-user, where /proc/cpuinfo is the host's).
std::set<std::string> cpu_features() {
  std::set<std::string> features;
#if defined(__aarch64__)
  const struct { const char* name; unsigned long key; int bit; } hwcaps[] = {
      {"fp", AT_HWCAP, 0},     {"asimd", AT_HWCAP, 1},  {"asimdhp", AT_HWCAP, 10}, {"asimddp", AT_HWCAP, 20},
      {"sve", AT_HWCAP, 22},   {"sve2", AT_HWCAP2, 1},  {"i8mm", AT_HWCAP2, 13},   {"bf16", AT_HWCAP2, 14}};
  for (const auto& cap : hwcaps)
    if (getauxval(cap.key) >> cap.bit & 1) features.insert(cap.name);
#else
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::stringstream words(line.substr(line.find(':') + 1));
    std::string word;
    while (words >> word) features.insert(word);
    break;
  }
#endif
  return features;
}

void check_cpu(const Artifact& a, const json& device, const std::string& preset) {
  const std::string library = a.path(kLibrary);
  const std::string built_for = library_arch(library);
  const std::string arch = device.value("arch", "");
  if (built_for != arch)
    bad(library + " is built for " + built_for + " but the manifest says " + arch + ": the artifact was edited; rebuild it");
  const std::string here = machine();
  if (arch != here)
    fail(MIXER_EDGE_WRONG_DEVICE, "artifact is built for " + arch + " (target " + preset + ") but this machine is " +
                                      here + ": run it on the device or rebuild with --target host");
  std::set<std::string> have = cpu_features();
  std::string missing;
  std::vector<std::string> needed = device.value("cpu_features", std::vector<std::string>{});
  std::sort(needed.begin(), needed.end());
  for (const auto& f : needed)
    if (!have.count(f)) missing += (missing.empty() ? "" : ", ") + f;
  if (!missing.empty())
    fail(MIXER_EDGE_WRONG_DEVICE, "artifact target " + preset + " needs CPU features this CPU lacks (" + missing +
                                      "): rebuild for this board's preset");
#if defined(__x86_64__)
  // Linux hands a process AMX tile state only when it asks (kernel 5.16 on); tile instructions fault until then.
  const long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (std::count(needed.begin(), needed.end(), "amx_tile") &&
      syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    fail(MIXER_EDGE_WRONG_DEVICE, std::string("the Linux kernel refused this process AMX tiles (") +
                                      std::strerror(errno) + "; Linux 5.16 or newer grants them): rebuild with "
                                      "--target x86-avx512-vnni");
#endif
}

// ---- params.npz: a stored zip of .npy files ------------------------------------------------------------
uint64_t le(const uint8_t* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = v << 8 | p[i];
  return v;
}

// A stored (uncompressed) zip, as numpy.savez writes it, read member by member: never held whole in memory.
class Zip {
 public:
  explicit Zip(const std::string& path) : file_(path, std::ios::binary) {
    file_.seekg(0, std::ios::end);
    size_ = file_ ? static_cast<uint64_t>(file_.tellg()) : 0;
    if (size_ < 22) throw std::runtime_error("not a zip file");
    const uint64_t tail_size = std::min<uint64_t>(size_, 22 + 65535);  // the end record and its comment
    const std::vector<uint8_t> tail = read(size_ - tail_size, tail_size);
    uint64_t eocd = tail_size;
    for (uint64_t i = tail_size - 22 + 1; i-- > 0;)
      if (le(&tail[i], 4) == 0x06054b50) {
        eocd = i;
        break;
      }
    if (eocd == tail_size) throw std::runtime_error("not a zip file");
    uint64_t count = le(&tail[eocd + 10], 2), cd_offset = le(&tail[eocd + 16], 4), cd_size = le(&tail[eocd + 12], 4);
    if ((count == 0xffff || cd_offset == 0xffffffff) && eocd >= 20 && le(&tail[eocd - 20], 4) == 0x07064b50) {
      const std::vector<uint8_t> z64 = read(le(&tail[eocd - 12], 8), 56);  // the zip64 end record
      if (le(z64.data(), 4) != 0x06064b50) throw std::runtime_error("bad zip64 directory");
      count = le(&z64[32], 8), cd_size = le(&z64[40], 8), cd_offset = le(&z64[48], 8);
    }
    const std::vector<uint8_t> cd = read(cd_offset, cd_size);
    for (uint64_t i = 0, p = 0; i < count; ++i) {
      if (p + 46 > cd.size() || le(&cd[p], 4) != 0x02014b50) throw std::runtime_error("bad zip directory");
      const uint64_t method = le(&cd[p + 10], 2), name_len = le(&cd[p + 28], 2), extra_len = le(&cd[p + 30], 2);
      uint64_t size = le(&cd[p + 24], 4), local = le(&cd[p + 42], 4);
      if (p + 46 + name_len + extra_len > cd.size()) throw std::runtime_error("bad zip directory");
      const std::string name(reinterpret_cast<const char*>(&cd[p + 46]), name_len);
      for (uint64_t e = p + 46 + name_len; e + 4 <= p + 46 + name_len + extra_len;) {  // zip64 sizes and offset
        const uint64_t id = le(&cd[e], 2), len = le(&cd[e + 2], 2);
        uint64_t q = e + 4;
        if (id == 1 && q + len <= cd.size()) {
          if (size == 0xffffffff && q + 8 <= e + 4 + len) size = le(&cd[q], 8), q += 8;
          if (le(&cd[p + 20], 4) == 0xffffffff) q += 8;  // the compressed size: the same, for a stored member
          if (local == 0xffffffff && q + 8 <= e + 4 + len) local = le(&cd[q], 8);
        }
        e += 4 + len;
      }
      members_[name] = Member{local, size, method == 0};
      p += 46 + name_len + extra_len + le(&cd[p + 32], 2);
    }
  }

  // The bytes of member `name` (a stored one), or std::runtime_error.
  std::vector<uint8_t> member(const std::string& name) {
    const auto it = members_.find(name);
    if (it == members_.end()) throw std::runtime_error("no array '" + safe_text(name, 80) + "'");
    if (!it->second.stored) throw std::runtime_error("array '" + safe_text(name, 80) + "' is compressed");
    const std::vector<uint8_t> header = read(it->second.local, 30);
    if (le(header.data(), 4) != 0x04034b50) throw std::runtime_error("bad zip member " + safe_text(name, 80));
    return read(it->second.local + 30 + le(&header[26], 2) + le(&header[28], 2), it->second.size);
  }

 private:
  struct Member {
    uint64_t local, size;  // where its local header starts, and its size
    bool stored;
  };

  std::vector<uint8_t> read(uint64_t offset, uint64_t n) {
    if (offset > size_ || n > size_ - offset) throw std::runtime_error("the zip file is cut short");
    std::vector<uint8_t> bytes(n);
    file_.seekg(static_cast<std::streamoff>(offset));
    file_.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(n));
    if (static_cast<uint64_t>(file_.gcount()) != n) throw std::runtime_error("the zip file could not be read");
    return bytes;
  }

  std::ifstream file_;
  uint64_t size_ = 0;
  std::map<std::string, Member> members_;
};

}  // namespace

// `text` fit for one terminal line (formats.safe_text): control characters escaped, at most `limit` characters.
std::string safe_text(const std::string& text, size_t limit) {
  std::string out;
  for (unsigned char ch : text) {
    if (ch == '\t') out += "\\t";
    else if (ch == '\r') out += "\\r";
    else if (ch == '\n') out += "\\n";
    else if (ch < 0x20 || ch == 0x7f) {
      char code[8];
      std::snprintf(code, sizeof code, "\\x%02x", ch);
      out += code;
    } else {
      out += static_cast<char>(ch);
    }
  }
  return out.size() <= limit ? out : out.substr(0, limit - 3) + "...";
}

int64_t Array::size() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

Artifact open_artifact(const std::string& given) {
  Artifact a;
  a.root = given.size() > 1 && given.back() == '/' ? given.substr(0, given.size() - 1) : given;
  const std::string manifest_path = a.path(kManifest);
  std::ifstream f(manifest_path, std::ios::binary);
  if (!f) bad(a.root + " is not a mixer-edge artifact (no manifest.json): pass the directory `compile` wrote");
  const std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  try {
    a.manifest = json::parse(text);
  } catch (const json::exception& exc) {
    bad(manifest_path + " is not valid JSON (" + safe_text(exc.what(), 120) + "): rebuild the artifact");
  }
  const json& m = a.manifest;
  const json version = m.is_object() && m.contains("format_version") ? m["format_version"] : json();
  if (!version.is_number_integer() || version.get<int64_t>() != MIXER_EDGE_FORMAT_VERSION) {
    std::string shown = version.is_null() ? "None" : version.dump();
    bad(a.root + " has artifact format version " + safe_text(shown, 40) + "; this runtime reads version " +
        std::to_string(MIXER_EDGE_FORMAT_VERSION) + ": rebuild it with this mixer-edge");
  }
  CanonicalJson canonical;
  json::sax_parse(text, &canonical);
  Sha256 digest;
  digest.update(canonical.text.data(), canonical.text.size());
  if (!m.contains("manifest_sha256") || m["manifest_sha256"] != digest.hexdigest())
    bad(manifest_path + " was edited after the build (its manifest_sha256 does not match its content): copy the "
                        "artifact again or rebuild it");

  // The fields this runtime uses, each checked as the Python schema checks it.
  Fields fields(m, manifest_path);
  a.input_shape = fields.dims("input.shape", 4);
  a.output_shape = fields.dims("output.shape", 2);
  a.labels = fields.texts("labels");
  a.params = fields.texts("params");
  const json& device = fields.at("target.device");
  a.kind = fields.text("target.device.kind");
  a.backend = device.contains("backend") && device["backend"].is_string() ? device["backend"].get<std::string>()
                                                                          : a.kind;
  const std::string preset = fields.text("target.preset");
  const int64_t channels = fields.at("preprocess.channels").is_number_integer()
                               ? fields.at("preprocess.channels").get<int64_t>() : -1;
  const std::vector<int64_t> size = fields.dims("preprocess.size", 2);
  a.mean = fields.numbers("preprocess.mean");
  a.std = fields.numbers("preprocess.std");
  a.resample = fields.text("preprocess.resample");
  if (fields.at("preprocess").is_object() && fields.at("preprocess").contains("crop_pct")) {
    const json& crop = fields.at("preprocess.crop_pct");
    if (!crop.is_number() || crop.is_boolean()) fields.wrong("preprocess.crop_pct", "Input should be a valid number");
    a.crop_pct = crop.get<double>();
    if (!(a.crop_pct > 0)) fields.wrong("preprocess.crop_pct", "Input should be greater than 0");
    if (!(a.crop_pct <= 1)) fields.wrong("preprocess.crop_pct", "Input should be less than or equal to 1");
  }
  if (a.output_shape[0] != a.input_shape[0])
    fields.wrong("output.shape", "has batch " + std::to_string(a.output_shape[0]) + " but input.shape has " +
                                     std::to_string(a.input_shape[0]));
  if (static_cast<int64_t>(a.labels.size()) != a.output_shape[1])
    fields.wrong("labels", "has " + std::to_string(a.labels.size()) + " labels but output.shape[1] says " +
                               std::to_string(a.output_shape[1]) + " classes: one label per class");
  if (channels != a.input_shape[1]) fields.wrong("preprocess.channels", "must equal input.shape[1]");
  if (size[0] != a.input_shape[2] || size[1] != a.input_shape[3])
    fields.wrong("preprocess.size", "must equal input.shape[2:]");
  if (static_cast<int64_t>(a.mean.size()) != channels || static_cast<int64_t>(a.std.size()) != channels)
    fields.wrong("preprocess.mean", "mean and std have one value per channel");
  for (float s : a.std)
    if (!(s > 0)) fields.wrong("preprocess.std", "every std is > 0");
  if (std::set<std::string>(a.params.begin(), a.params.end()).size() != a.params.size())
    fields.wrong("params", "lists a weight twice");

  const json& files = fields.at("files");
  if (!files.is_object()) fields.wrong("files", "Input should be a valid dictionary");
  static const std::map<std::string, std::set<std::string>> model_files = {
      {"cpu", {kParams, kLibrary}}, {"cuda", {kParams, kLibrary, kCudaKernels}},
      {"tvm-vulkan", {kParams, kLibrary}}, {"wgpu", {kParams, kProgram}},
      {"cuda-driver", {kParams, kCudaPlan, kCudaKernels}}};
  auto expected = model_files.find(a.backend);
  if (expected == model_files.end())
    fields.wrong("target.device.backend", "names no backend this runtime knows: rebuild with this mixer-edge");
  std::set<std::string> listed;
  for (const auto& [name, sha] : files.items()) {
    if (!sha.is_string()) fields.wrong("files." + name, "String should match pattern '^[0-9a-f]{64}$'");
    if (name == kParams || name == kLibrary || name == kProgram || name == kCudaKernels || name == kCudaPlan)
      listed.insert(name);
  }
  if (listed != expected->second) fields.wrong("files", "does not list this build's model files");

  for (const auto& [name, sha] : files.items()) {
    bool printable = !name.empty() && std::all_of(name.begin(), name.end(), [](unsigned char c) { return c >= 0x20 && c != 0x7f; });
    if (!printable || name.find('/') != std::string::npos || name == "." || name == "..")
      bad(manifest_path + " lists " + safe_text(name, 80) + ", which is not a file inside the artifact: rebuild it");
    const std::string file = a.path(name);
    std::ifstream probe(file, std::ios::binary);
    if (!probe) bad(a.root + " is missing " + name + ": copy the whole artifact directory");
    if (file_sha256(file) != sha.get<std::string>())
      bad(file + " does not match its sha256 in the manifest (modified or corrupt): copy the artifact again or "
                 "rebuild it");
  }

  if (a.backend == "cpu") {
    check_cpu(a, device, preset);
  } else if (a.backend != "wgpu" && a.backend != "cuda-driver") {  // those engines check their GPU themselves
    fail(MIXER_EDGE_UNSUPPORTED, a.root + " is a " + a.backend + " artifact; the native runtime runs cpu, wgpu and "
                                 "cuda-driver artifacts (build with [build] cuda_runtime = \"driver\"): use the "
                                 "Python runtime");
  }
  return a;
}

std::vector<Array> read_params(const Artifact& a) {
  const std::string path = a.path(kParams);
  try {
    Zip zip(path);
    std::vector<Array> weights;
    for (const std::string& name : a.params) {
      std::vector<uint8_t> bytes = zip.member(name + ".npy");
      const npy::View view = npy::parse(name, bytes.data(), bytes.size());
      const size_t start = view.data - bytes.data();
      bytes.erase(bytes.begin(), bytes.begin() + start);  // the .npy header: what is left is the array
      weights.push_back(Array{name, view.dtype, view.shape, std::move(bytes)});
    }
    return weights;
  } catch (const std::runtime_error& exc) {
    if (dynamic_cast<const Error*>(&exc)) throw;
    bad(path + " does not hold the plain arrays the manifest lists (" + std::string(exc.what()) +
        "): rebuild the artifact");
  } catch (const std::exception& exc) {  // std::stoll on a forged shape, bad_alloc on a forged size
    bad(path + " does not hold the plain arrays the manifest lists (" + std::string(exc.what()) +
        "): rebuild the artifact");
  }
}

}  // namespace mixer_edge
