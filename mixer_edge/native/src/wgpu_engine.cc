// The wgpu backend: program.json's WGSL kernels and launch plan (compiler/webgpu.py) replayed on the best
// Vulkan device through wgpu-native's C API. A port of mixer_edge/vulkan.py (Program, stored(), adapter(),
// WgpuProgram): the same checks in the same order, with the same messages.
//
// At load every kernel gets its pipeline, every launch its uniform buffer and bind group, every weight it
// uses and every constant its GPU buffer (integers and bools as 32-bit: see stored()). An inference writes
// the input, records all dispatches into one compute pass, copies the logits into a staging buffer and
// reads them back: nothing else crosses between host and GPU, and nothing is allocated but the commands.
#include <stdlib.h>  // mkdtemp, setenv, unsetenv (POSIX)
#include <unistd.h>  // rmdir

#include <algorithm>
#include <array>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine.h"
#include "json_fields.h"
#include "wgpu.h"  // wgpu-native's extensions; includes webgpu.h

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "weights, constants and uniforms are copied as little-endian bytes"
#endif

namespace mixer_edge {
namespace {

using Json = nlohmann::ordered_json;  // keeps `kernels` in file order, as Python's dict does

constexpr int64_t kProgramFormat = 1;   // compiler/webgpu.py writes it
constexpr int64_t kMaxWorkgroups = 65535;  // per grid dimension, WebGPU's maxComputeWorkgroupsPerDimension
constexpr int64_t kMaxValueId = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxBytes = int64_t{1} << 40;

bool storable(const std::string& dtype) {  // what a WGSL storage buffer holds (STORABLE)
  return dtype == "float32" || dtype == "float16" || dtype == "int32" || dtype == "uint32";
}

uint64_t aligned(uint64_t nbytes) { return std::max<uint64_t>(4, (nbytes + 3) / 4 * 4); }

// The last non-empty line of a multi-line message, without terminal colours (errors.reason(last=True)).
std::string last_line(const std::string& message, const std::string& otherwise) {
  std::string plain;
  for (size_t i = 0; i < message.size(); ++i) {
    if (message[i] == '\x1b' && i + 1 < message.size() && message[i + 1] == '[') {
      size_t end = message.find_first_not_of("0123456789;", i + 2);
      if (end != std::string::npos && message[end] == 'm') {
        i = end;
        continue;
      }
    }
    plain += message[i];
  }
  std::string line, last;
  std::istringstream lines(plain);
  while (std::getline(lines, line)) {
    size_t begin = line.find_first_not_of(" \t\r\f\v"), end = line.find_last_not_of(" \t\r\f\v");
    if (begin != std::string::npos) last = line.substr(begin, end - begin + 1);
  }
  if (last.empty()) return otherwise;
  return safe_text(last.size() <= 200 ? last : last.substr(0, 197) + "...");
}

std::string text(WGPUStringView view) {
  if (!view.data) return "";
  return view.length == WGPU_STRLEN ? std::string(view.data) : std::string(view.data, view.length);
}

WGPUStringView view(const std::string& text) { return {text.data(), text.size()}; }

// ---- program.json (vulkan.py's Program schema) -------------------------------------------------------

struct Launch {
  std::string kernel;
  std::vector<int64_t> buffers;  // positions in the step's args
  std::vector<uint8_t> scalars;  // packed little-endian, i32 and f32
  std::array<int64_t, 3> grid;
};

struct Step {
  std::string op;                // call, storage, view, constant
  int64_t out = -1;              // storage, view, constant
  int64_t bytes = 0;             // storage
  int64_t src = 0, offset = 0;   // view
  std::vector<int64_t> shape;    // view, constant
  std::string dtype;             // view ("": src's), constant
  std::vector<uint8_t> data;     // constant, decoded
  std::vector<int64_t> args;     // call
  std::vector<Launch> launches;  // call
};

struct Program {
  std::vector<Step> steps;
  int64_t output = 0;
  std::vector<std::pair<std::string, std::string>> kernels;  // name (its entry point), WGSL
};

// Validates program.json's structure; every refusal is one line naming the field, then "rebuild the artifact".
class ProgramReader : private JsonFields<Json> {
 public:
  using JsonFields::JsonFields;

  Program read(const Json& doc) const {
    record(doc, "", {"format", "steps", "output", "kernels"});
    Program program;
    if (!doc["format"].is_number_integer() || doc["format"] != kProgramFormat)
      bad("format", "should be " + std::to_string(kProgramFormat) + " (the program format this runtime reads)",
          &doc["format"]);
    const Json& steps = array(doc["steps"], "steps");
    for (size_t i = 0; i < steps.size(); ++i) program.steps.push_back(step(steps[i], "steps." + std::to_string(i)));
    program.output = integer(doc["output"], "output", 0, kMaxValueId);
    const Json& kernels = doc["kernels"];
    if (!kernels.is_object()) bad("kernels", "should be an object", &kernels);
    for (const auto& item : kernels.items()) {
      if (!identifier(item.key()))
        bad("kernels", "kernel name '" + safe_text(item.key(), 60) + "' is not a WGSL identifier");
      program.kernels.emplace_back(item.key(), string(item.value(), "kernels." + item.key()));
    }
    consistent(program);
    return program;
  }

 private:
  Step step(const Json& j, const std::string& field) const {
    if (!j.is_object() || !j.contains("op")) bad(field, "should be an object with an 'op'", &j);
    Step step;
    step.op = j["op"].is_string() ? j["op"].get<std::string>() : "";
    if (step.op != "call" && step.op != "storage" && step.op != "view" && step.op != "constant")
      bad(at(field, "op"), "should be one of call, storage, view, constant", &j["op"]);
    const std::string path = at(field, step.op);  // as pydantic names a field of a tagged union: steps.3.view.offset
    if (step.op == "call") {
      record(j, path, {"op", "func", "args", "launches"});
      string(j["func"], at(path, "func"));
      step.args = integers(j["args"], at(path, "args"), 0, kMaxValueId);
      const Json& launches = array(j["launches"], at(path, "launches"));
      for (size_t i = 0; i < launches.size(); ++i)
        step.launches.push_back(launch(launches[i], at(path, "launches." + std::to_string(i)), step.args.size()));
    } else if (step.op == "storage") {
      record(j, path, {"op", "out", "bytes"});
      step.out = integer(j["out"], at(path, "out"), 0, kMaxValueId);
      step.bytes = integer(j["bytes"], at(path, "bytes"), 1, kMaxBytes);
    } else if (step.op == "view") {
      record(j, path, {"op", "out", "src", "offset", "shape"}, {"dtype"});
      step.out = integer(j["out"], at(path, "out"), 0, kMaxValueId);
      step.src = integer(j["src"], at(path, "src"), 0, kMaxValueId);
      step.offset = integer(j["offset"], at(path, "offset"), 0, kMaxBytes);
      step.shape = shape(j["shape"], at(path, "shape"));
      if (j.contains("dtype") && !j["dtype"].is_null()) {  // absent or null: src's
        step.dtype = string(j["dtype"], at(path, "dtype"));
        if (!itemsize(step.dtype)) bad(at(path, "dtype"), "is not a numpy dtype WGSL storage can view", &j["dtype"]);
      }
    } else {
      record(j, path, {"op", "out", "dtype", "shape", "data"});
      step.out = integer(j["out"], at(path, "out"), 0, kMaxValueId);
      step.dtype = string(j["dtype"], at(path, "dtype"));
      if (!storable(step.dtype))
        bad(at(path, "dtype"), "should be one of float32, float16, int32, uint32", &j["dtype"]);
      step.shape = shape(j["shape"], at(path, "shape"));
      step.data = constant(string(j["data"], at(path, "data")), step.dtype, step.shape, at(path, "data"));
    }
    return step;
  }

  Launch launch(const Json& j, const std::string& field, size_t args) const {
    record(j, field, {"kernel", "buffers", "scalars", "grid"});
    Launch launch;
    launch.kernel = string(j["kernel"], at(field, "kernel"));
    if (!identifier(launch.kernel)) bad(at(field, "kernel"), "is not a WGSL identifier", &j["kernel"]);
    launch.buffers = integers(j["buffers"], at(field, "buffers"), 0, std::numeric_limits<int64_t>::max());
    for (int64_t position : launch.buffers)
      if (position >= static_cast<int64_t>(args))
        bad(at(field, "buffers"), "binds argument " + std::to_string(position) + " but the call has " +
                                      std::to_string(args) + " args");
    const Json& scalars = array(j["scalars"], at(field, "scalars"));
    for (size_t i = 0; i < scalars.size(); ++i)
      scalar(scalars[i], at(field, "scalars." + std::to_string(i)), launch.scalars);
    std::vector<int64_t> grid = integers(j["grid"], at(field, "grid"), 1, kMaxValueId);
    if (grid.size() != 3) bad(at(field, "grid"), "should hold 3 integers (x, y, z)", &j["grid"]);
    std::copy(grid.begin(), grid.end(), launch.grid.begin());
    return launch;
  }

  // A kernel's scalar argument, appended to `pod`: ["i32", an int32] or ["f32", a finite float32].
  void scalar(const Json& j, const std::string& field, std::vector<uint8_t>& pod) const {
    uint8_t bytes[4];
    if (j.is_array() && j.size() == 2 && j[0] == "i32" && j[1].is_number_integer() &&
        (j[1].is_number_unsigned() ? j[1].get<uint64_t>() <= uint64_t{INT32_MAX}
                                   : j[1].get<int64_t>() >= INT32_MIN && j[1].get<int64_t>() <= INT32_MAX)) {
      int32_t value = static_cast<int32_t>(j[1].get<int64_t>());
      std::memcpy(bytes, &value, 4);
    } else if (j.is_array() && j.size() == 2 && j[0] == "f32" && j[1].is_number() &&
               std::fabs(j[1].get<double>()) <= std::numeric_limits<float>::max()) {
      float value = static_cast<float>(j[1].get<double>());
      std::memcpy(bytes, &value, 4);
    } else {
      bad(field, "a scalar is [\"i32\", an int32] or [\"f32\", a finite float32]", &j);
    }
    pod.insert(pod.end(), bytes, bytes + 4);
  }

  // Program._consistent: every launch names a kernel, no step reuses another's id.
  void consistent(const Program& program) const {
    std::set<std::string> kernels;
    for (const auto& kernel : program.kernels) kernels.insert(kernel.first);
    std::set<int64_t> created;
    for (size_t i = 0; i < program.steps.size(); ++i) {
      const Step& step = program.steps[i];
      std::string field = "steps." + std::to_string(i);
      for (size_t j = 0; j < step.launches.size(); ++j)
        if (!kernels.count(step.launches[j].kernel)) {
          Json name = step.launches[j].kernel;
          bad(field + ".launches." + std::to_string(j) + ".kernel", "names no kernel of `kernels`", &name);
        }
      if (step.out >= 0 && !created.insert(step.out).second) {
        Json out = step.out;
        bad(field + ".out", "reuses the id of an earlier step's value", &out);
      }
    }
  }
};

Program read_program(const std::string& path) {
  return read_json<Json>(path, [&](const Json& doc) { return ProgramReader(path).read(doc); });
}

// ---- weights and kernels -------------------------------------------------------------------------------

// `data` (of `dtype`) as To: 64-bit integers narrowed, refused where a value does not fit; others widened.
template <typename From, typename To>
std::string convert(std::vector<uint8_t>& data, const std::string& dtype, const std::string& to,
                    const std::string& what) {
  size_t n = data.size() / sizeof(From);
  std::vector<uint8_t> out(n * sizeof(To));
  From lo = std::numeric_limits<From>::max(), hi = std::numeric_limits<From>::lowest();
  for (size_t i = 0; i < n; ++i) {
    From value;
    std::memcpy(&value, &data[i * sizeof(From)], sizeof(From));
    lo = std::min(lo, value);
    hi = std::max(hi, value);
    To converted = static_cast<To>(value);
    std::memcpy(&out[i * sizeof(To)], &converted, sizeof(To));
  }
  if constexpr (sizeof(From) > sizeof(To)) {
    if (n && (lo < std::numeric_limits<To>::lowest() || hi > std::numeric_limits<To>::max()))
      fail(MIXER_EDGE_BAD_ARTIFACT, what + " holds " + dtype + " values beyond " + to + " (" + std::to_string(lo) +
                                        " to " + std::to_string(hi) +
                                        "), which WGSL cannot hold (it has no 64-bit integers): build for a CPU or "
                                        "CUDA target");
  }
  data = std::move(out);
  return to;
}

// A weight as a GPU buffer holds it (vulkan.py's stored(), STORED_AS): `data` replaced, its dtype returned.
std::string stored(std::vector<uint8_t>& data, const std::string& dtype, const std::string& what) {
  if (dtype == "int64") return convert<int64_t, int32_t>(data, dtype, "int32", what);
  if (dtype == "uint64") return convert<uint64_t, uint32_t>(data, dtype, "uint32", what);
  if (dtype == "bool" || dtype == "int8") return convert<int8_t, int32_t>(data, dtype, "int32", what);
  if (dtype == "int16") return convert<int16_t, int32_t>(data, dtype, "int32", what);
  if (dtype == "uint8") return convert<uint8_t, uint32_t>(data, dtype, "uint32", what);
  if (dtype == "uint16") return convert<uint16_t, uint32_t>(data, dtype, "uint32", what);
  if (!itemsize(dtype))
    fail(MIXER_EDGE_BAD_ARTIFACT, what + " is " + dtype + ", not a number array: rebuild the artifact");
  return dtype;
}

// The buffers kernel `name`'s WGSL declares, in binding order (vulkan.py's _bindings): storage ones ("read",
// "read_write") then one "uniform". Matches r"@binding\((\d+)\)\s*var<(\w+)(?:,\s*(\w+))?>" by hand.
std::vector<std::string> bindings(const std::string& name, const std::string& wgsl, const std::string& source) {
  auto word = [&](size_t& i) {
    size_t start = i;
    while (i < wgsl.size() && (std::isalnum(static_cast<unsigned char>(wgsl[i])) || wgsl[i] == '_')) ++i;
    return wgsl.substr(start, i - start);
  };
  auto spaces = [&](size_t& i) {
    while (i < wgsl.size() && std::isspace(static_cast<unsigned char>(wgsl[i]))) ++i;
  };
  std::vector<std::pair<uint64_t, std::string>> found;  // (binding, kind)
  const std::string tag = "@binding(";
  for (size_t start = wgsl.find(tag); start != std::string::npos; start = wgsl.find(tag, start + 1)) {
    size_t i = start + tag.size(), digits = i;
    uint64_t binding = 0;
    for (; i < wgsl.size() && std::isdigit(static_cast<unsigned char>(wgsl[i])); ++i)
      binding = std::min<uint64_t>(binding * 10 + (wgsl[i] - '0'), uint64_t{1} << 40);
    if (i == digits || wgsl.compare(i, 1, ")") != 0) continue;
    spaces(++i);
    if (wgsl.compare(i, 4, "var<") != 0) continue;
    i += 4;
    std::string space = word(i), access;
    if (space.empty()) continue;
    if (wgsl.compare(i, 1, ",") == 0) {
      size_t j = i + 1;
      spaces(j);
      access = word(j);
      if (!access.empty() && wgsl.compare(j, 1, ">") == 0) i = j;
      else access.clear();
    }
    if (wgsl.compare(i, 1, ">") != 0) continue;
    found.emplace_back(binding, space == "uniform" ? "uniform" : access.empty() ? "read" : access);
    start = i;
  }
  std::stable_sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  bool valid = !found.empty() && found.back().second == "uniform";
  for (size_t i = 0; i < found.size(); ++i)
    valid = valid && found[i].first == i &&
            (i + 1 == found.size() || found[i].second == "read" || found[i].second == "read_write");
  if (!valid)
    fail(MIXER_EDGE_BAD_ARTIFACT, source + " kernel " + name +
                                      " does not declare storage buffers then one uniform (bindings 0, 1, ...): "
                                      "rebuild the artifact");
  std::vector<std::string> kinds;
  for (auto& binding : found) kinds.push_back(binding.second);
  return kinds;
}

bool needs_f16(const Program& program) {  // a line that starts with `enable f16;` (vulkan.py's _features)
  for (const auto& kernel : program.kernels) {
    std::istringstream lines(kernel.second);
    std::string line;
    while (std::getline(lines, line)) {
      size_t begin = line.find_first_not_of(" \t\r\f\v");
      if (begin != std::string::npos && line.compare(begin, 11, "enable f16;") == 0) return true;
    }
  }
  return false;
}

// ---- the Vulkan device ----------------------------------------------------------------------------------

// Looking for GPUs, the Vulkan loader asks libwayland for a display, which prints "error: XDG_RUNTIME_DIR is
// invalid or not set in the environment." wherever that variable is unset or not absolute. While this lives it
// names an empty private directory instead (vulkan.py's _wayland_runtime_dir); a valid setting is left alone.
class WaylandRuntimeDir {
 public:
  WaylandRuntimeDir() {
    const char* before = std::getenv("XDG_RUNTIME_DIR");
    if (before && before[0] == '/') return;
    if (before) before_ = before;
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && tmp[0] == '/' ? tmp : "/tmp") + "/mixer-edge-xdg-XXXXXX";
    std::vector<char> path(pattern.begin(), pattern.end());
    path.push_back('\0');
    if (!mkdtemp(path.data())) return;  // then libwayland may print its line, nothing worse
    dir_ = path.data();
    setenv("XDG_RUNTIME_DIR", dir_.c_str(), 1);
  }
  ~WaylandRuntimeDir() {
    if (dir_.empty()) return;
    if (before_) setenv("XDG_RUNTIME_DIR", before_->c_str(), 1);
    else unsetenv("XDG_RUNTIME_DIR");
    rmdir(dir_.c_str());
  }
  WaylandRuntimeDir(const WaylandRuntimeDir&) = delete;
  WaylandRuntimeDir& operator=(const WaylandRuntimeDir&) = delete;

 private:
  std::optional<std::string> before_;  // none: unset
  std::string dir_;
};

const char* backend_name(WGPUBackendType type) {
  switch (type) {
    case WGPUBackendType_Null: return "Null";
    case WGPUBackendType_WebGPU: return "WebGPU";
    case WGPUBackendType_D3D11: return "D3D11";
    case WGPUBackendType_D3D12: return "D3D12";
    case WGPUBackendType_Metal: return "Metal";
    case WGPUBackendType_Vulkan: return "Vulkan";
    case WGPUBackendType_OpenGL: return "OpenGL";
    case WGPUBackendType_OpenGLES: return "OpenGLES";
    default: return "Undefined";
  }
}

const char* adapter_type_name(WGPUAdapterType type) {
  switch (type) {
    case WGPUAdapterType_DiscreteGPU: return "DiscreteGPU";
    case WGPUAdapterType_IntegratedGPU: return "IntegratedGPU";
    case WGPUAdapterType_CPU: return "CPU";
    default: return "Unknown";
  }
}

int preference(WGPUAdapterType type) {  // a real GPU before a software one (vulkan.py's _PREFERENCE)
  switch (type) {
    case WGPUAdapterType_DiscreteGPU: return 0;
    case WGPUAdapterType_IntegratedGPU: return 1;
    case WGPUAdapterType_CPU: return 3;  // WebGPU has no VirtualGPU type (2)
    default: return 4;
  }
}

struct AdapterInfo {
  std::string backend, device, type;
  int preference;
};

AdapterInfo adapter_info(WGPUAdapter adapter) {
  WGPUAdapterInfo info{};
  if (wgpuAdapterGetInfo(adapter, &info) != WGPUStatus_Success) return {"Undefined", "?", "Unknown", 4};
  AdapterInfo out{backend_name(info.backendType), text(info.device), adapter_type_name(info.adapterType),
                  preference(info.adapterType)};
  wgpuAdapterInfoFreeMembers(info);
  return out;
}

std::vector<WGPUAdapter> enumerate(WGPUInstance instance, const WGPUInstanceEnumerateAdapterOptions* options) {
  std::vector<WGPUAdapter> adapters(wgpuInstanceEnumerateAdapters(instance, options, nullptr));
  adapters.resize(wgpuInstanceEnumerateAdapters(instance, options, adapters.data()));
  return adapters;
}

// Where wgpu reports a validation error of the device: the first one is kept, as one line.
void on_error(WGPUDevice const*, WGPUErrorType type, WGPUStringView message, void* error, void*) {
  static const char* const names[] = {"", "NoError", "Validation", "OutOfMemory", "Internal", "Unknown"};
  try {
    auto* first = static_cast<std::string*>(error);
    if (first->empty()) first->assign(last_line(text(message), names[type >= 1 && type <= 5 ? type : 5]));
  } catch (...) {  // never unwind into wgpu
  }
}

struct DeviceRequest {
  WGPUDevice device = nullptr;
  std::string message;
};

void on_device(WGPURequestDeviceStatus status, WGPUDevice device, WGPUStringView message, void* request, void*) {
  auto* out = static_cast<DeviceRequest*>(request);
  try {
    if (status == WGPURequestDeviceStatus_Success) out->device = device;
    else out->message = last_line(text(message), "the device request failed");
  } catch (...) {
  }
}

struct Mapping {
  bool done = false;
  WGPUMapAsyncStatus status = WGPUMapAsyncStatus_Error;
  std::string message;
};

void on_mapped(WGPUMapAsyncStatus status, WGPUStringView message, void* mapping, void*) {
  auto* out = static_cast<Mapping*>(mapping);
  out->done = true;
  out->status = status;
  try {
    if (status != WGPUMapAsyncStatus_Success) out->message = last_line(text(message), "mapping failed");
  } catch (...) {
  }
}

// ---- the engine -----------------------------------------------------------------------------------------

class WgpuEngine final : public Engine {
 public:
  explicit WgpuEngine(std::string source) : source_(std::move(source)) {}
  ~WgpuEngine() override;
  WgpuEngine(const WgpuEngine&) = delete;
  WgpuEngine& operator=(const WgpuEngine&) = delete;

  // Everything happens here, not in the constructor: if it throws, the destructor still releases what exists.
  void load(const Program& program, std::vector<Array> weights, const std::vector<int64_t>& input_shape,
            const std::vector<int64_t>& output_shape);
  void run(const float* input, float* logits) override;
  std::string device() const override { return description_; }

 private:
  struct Value {  // a tensor on the GPU: where it lies, its size and its element type
    WGPUBuffer buffer;
    uint64_t offset, bytes;
    std::string dtype;
  };
  struct Kernel {
    std::vector<std::string> kinds;  // see bindings()
    WGPUBindGroupLayout layout;
    WGPUComputePipeline pipeline;
  };
  struct Dispatch {
    WGPUComputePipeline pipeline;
    WGPUBindGroup group;
    uint32_t grid[3];
  };

  void open_adapter();
  void setup(const Program& program, std::vector<Array>& weights, const std::vector<int64_t>& input_shape,
             const std::vector<int64_t>& output_shape);
  Kernel kernel(const std::string& name, const std::string& wgsl);
  Dispatch dispatch(const Kernel& kernel, const Launch& launch, const std::vector<Value>& buffers);
  WGPUBuffer buffer(uint64_t size, WGPUBufferUsage usage, const std::vector<uint8_t>* data = nullptr);
  WGPUCommandBuffer commands();
  [[noreturn]] void setup_failed(const std::string& why) const;
  [[noreturn]] void run_failed(std::string why);
  void check() const {  // the first error wgpu reported since the device was made, if any
    if (!error_.empty()) setup_failed(error_);
  }

  std::string source_;       // program.json, for messages
  std::string name_;         // the adapter's device name, for messages
  std::string description_;  // "Vulkan <name> (<type>)"
  std::string error_;        // set by on_error
  WGPULimits limits_{};
  WGPUInstance instance_ = nullptr;
  WGPUAdapter adapter_ = nullptr;
  WGPUDevice device_ = nullptr;
  WGPUQueue queue_ = nullptr;
  std::vector<WGPUBuffer> buffers_;  // all of them, for the destructor
  std::vector<WGPUShaderModule> modules_;
  std::vector<WGPUBindGroupLayout> layouts_;
  std::vector<WGPUPipelineLayout> pipeline_layouts_;
  std::vector<WGPUComputePipeline> pipelines_;
  std::vector<WGPUBindGroup> groups_;
  std::vector<Dispatch> dispatches_;
  WGPUBuffer input_ = nullptr;
  uint64_t input_bytes_ = 0;
  WGPUBuffer output_ = nullptr, staging_ = nullptr;  // the logits' buffer, and the mappable copy of them
  uint64_t copy_offset_ = 0, copy_bytes_ = 0;        // the copied region: 4-byte aligned, around the logits
  uint64_t skip_ = 0, logits_bytes_ = 0;             // where the logits lie inside it
};

WgpuEngine::~WgpuEngine() {  // wgpu keeps what a submitted command still uses until it has run
  for (WGPUBindGroup group : groups_) wgpuBindGroupRelease(group);
  for (WGPUComputePipeline pipeline : pipelines_) wgpuComputePipelineRelease(pipeline);
  for (WGPUPipelineLayout layout : pipeline_layouts_) wgpuPipelineLayoutRelease(layout);
  for (WGPUBindGroupLayout layout : layouts_) wgpuBindGroupLayoutRelease(layout);
  for (WGPUShaderModule module : modules_) wgpuShaderModuleRelease(module);
  for (WGPUBuffer buffer : buffers_) wgpuBufferRelease(buffer);
  if (queue_) wgpuQueueRelease(queue_);
  if (device_) wgpuDeviceRelease(device_);
  if (adapter_) wgpuAdapterRelease(adapter_);
  if (instance_) wgpuInstanceRelease(instance_);
}

void WgpuEngine::setup_failed(const std::string& why) const {
  fail(MIXER_EDGE_BAD_ARTIFACT, source_ + " could not be set up on the Vulkan device " + name_ + " (" +
                                    safe_text(why, 200) + "): rebuild the artifact");
}

// The best Vulkan device wgpu sees (a real GPU before a software one), or a clear error (vulkan.py's adapter()).
void WgpuEngine::open_adapter() {
  std::vector<WGPUAdapter> adapters;
  {
    WaylandRuntimeDir quiet;
    instance_ = wgpuCreateInstance(nullptr);
    if (!instance_)
      fail(MIXER_EDGE_WRONG_DEVICE, "wgpu could not start (no instance): install the GPU's Vulkan driver");
    WGPUInstanceEnumerateAdapterOptions vulkan{};
    vulkan.backends = WGPUInstanceBackend_Vulkan;
    adapters = enumerate(instance_, &vulkan);
  }
  int best = -1, best_preference = 0;
  for (size_t i = 0; i < adapters.size(); ++i) {
    AdapterInfo info = adapter_info(adapters[i]);
    if (info.backend != "Vulkan" || (best >= 0 && info.preference >= best_preference)) continue;
    best = static_cast<int>(i);
    best_preference = info.preference;
    name_ = info.device;
    description_ = info.backend + " " + info.device + " (" + info.type + ")";
  }
  for (size_t i = 0; i < adapters.size(); ++i)
    if (static_cast<int>(i) == best) adapter_ = adapters[i];
    else wgpuAdapterRelease(adapters[i]);
  if (!adapter_) {
    std::string others;
    {
      WaylandRuntimeDir quiet;
      for (WGPUAdapter other : enumerate(instance_, nullptr)) {
        AdapterInfo info = adapter_info(other);
        others += (others.empty() ? "" : ", ") + info.backend + " " + info.device;
        wgpuAdapterRelease(other);
      }
    }
    fail(MIXER_EDGE_WRONG_DEVICE, "no Vulkan device found by wgpu (it sees: " + (others.empty() ? "none" : others) +
                                      "): install the GPU's Vulkan driver (a software device: apt-get install "
                                      "mesa-vulkan-drivers libvulkan1)");
  }
  if (wgpuAdapterGetLimits(adapter_, &limits_) != WGPUStatus_Success)
    fail(MIXER_EDGE_WRONG_DEVICE, "the Vulkan device " + name_ + " does not tell its limits: update its Vulkan driver");
}

void WgpuEngine::load(const Program& program, std::vector<Array> weights, const std::vector<int64_t>& input_shape,
                      const std::vector<int64_t>& output_shape) {
  open_adapter();
  try {
    setup(program, weights, input_shape, output_shape);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& exc) {  // e.g. out of host memory: one line too
    setup_failed(exc.what());
  }
}

WGPUBuffer WgpuEngine::buffer(uint64_t size, WGPUBufferUsage usage, const std::vector<uint8_t>* data) {
  WGPUBufferDescriptor descriptor{};
  descriptor.usage = usage;
  descriptor.size = size;
  descriptor.mappedAtCreation = data != nullptr;
  WGPUBuffer buffer = wgpuDeviceCreateBuffer(device_, &descriptor);
  check();
  if (!buffer) setup_failed("no buffer of " + std::to_string(size) + " bytes");
  buffers_.push_back(buffer);
  if (data) {  // mapped at creation: zeroed, so the padding to 4 bytes is zeros, as vulkan.py writes it
    void* mapped = wgpuBufferGetMappedRange(buffer, 0, size);
    check();
    if (!mapped) setup_failed("a buffer of " + std::to_string(size) + " bytes could not be mapped");
    if (!data->empty()) std::memcpy(mapped, data->data(), data->size());
    wgpuBufferUnmap(buffer);
  }
  return buffer;
}

// A kernel's bind group layout and pipeline; its entry point is its name.
WgpuEngine::Kernel WgpuEngine::kernel(const std::string& name, const std::string& wgsl) {
  Kernel kernel;
  kernel.kinds = bindings(name, wgsl, source_);
  std::vector<WGPUBindGroupLayoutEntry> entries(kernel.kinds.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    entries[i].binding = static_cast<uint32_t>(i);
    entries[i].visibility = WGPUShaderStage_Compute;
    entries[i].buffer.type = kernel.kinds[i] == "uniform"      ? WGPUBufferBindingType_Uniform
                             : kernel.kinds[i] == "read_write" ? WGPUBufferBindingType_Storage
                                                               : WGPUBufferBindingType_ReadOnlyStorage;
  }
  WGPUBindGroupLayoutDescriptor layout{};
  layout.entryCount = entries.size();
  layout.entries = entries.data();
  kernel.layout = wgpuDeviceCreateBindGroupLayout(device_, &layout);
  layouts_.push_back(kernel.layout);

  WGPUPipelineLayoutDescriptor pipeline_layout{};
  pipeline_layout.bindGroupLayoutCount = 1;
  pipeline_layout.bindGroupLayouts = &kernel.layout;
  pipeline_layouts_.push_back(wgpuDeviceCreatePipelineLayout(device_, &pipeline_layout));

  WGPUShaderSourceWGSL code{};
  code.chain.sType = WGPUSType_ShaderSourceWGSL;
  code.code = view(wgsl);
  WGPUShaderModuleDescriptor module{};
  module.nextInChain = &code.chain;
  modules_.push_back(wgpuDeviceCreateShaderModule(device_, &module));

  WGPUComputePipelineDescriptor pipeline{};
  pipeline.layout = pipeline_layouts_.back();
  pipeline.compute.module = modules_.back();
  pipeline.compute.entryPoint = view(name);
  kernel.pipeline = wgpuDeviceCreateComputePipeline(device_, &pipeline);
  pipelines_.push_back(kernel.pipeline);
  check();
  return kernel;
}

// One launch: its uniform buffer (the kernel's scalars, then packGridDimX: it returns early past
// blockIdx.x == grid x - 1, padded to 16 bytes) and its bind group.
WgpuEngine::Dispatch WgpuEngine::dispatch(const Kernel& kernel, const Launch& launch,
                                          const std::vector<Value>& buffers) {
  int64_t largest = *std::max_element(launch.grid.begin(), launch.grid.end());
  if (largest > kMaxWorkgroups)
    fail(MIXER_EDGE_BAD_ARTIFACT, "kernel " + launch.kernel + " launches " + std::to_string(largest) +
                                      " workgroups in one dimension; WebGPU allows " + std::to_string(kMaxWorkgroups) +
                                      ": build with a smaller batch");
  std::vector<uint8_t> pod = launch.scalars;
  uint32_t last = static_cast<uint32_t>(launch.grid[0] - 1);
  pod.insert(pod.end(), reinterpret_cast<uint8_t*>(&last), reinterpret_cast<uint8_t*>(&last) + 4);
  pod.resize((pod.size() + 15) / 16 * 16);
  WGPUBuffer uniform = buffer(pod.size(), WGPUBufferUsage_Uniform, &pod);

  std::vector<WGPUBindGroupEntry> entries(buffers.size() + 1);
  for (size_t i = 0; i < buffers.size(); ++i) {
    entries[i].binding = static_cast<uint32_t>(i);
    entries[i].buffer = buffers[i].buffer;
    entries[i].offset = buffers[i].offset;
    entries[i].size = aligned(buffers[i].bytes);
  }
  entries.back().binding = static_cast<uint32_t>(buffers.size());
  entries.back().buffer = uniform;
  entries.back().size = pod.size();
  WGPUBindGroupDescriptor group{};
  group.layout = kernel.layout;
  group.entryCount = entries.size();
  group.entries = entries.data();
  groups_.push_back(wgpuDeviceCreateBindGroup(device_, &group));
  check();
  Dispatch out{kernel.pipeline, groups_.back(), {}};
  for (int i = 0; i < 3; ++i) out.grid[i] = static_cast<uint32_t>(launch.grid[i]);
  return out;
}

// The plan checked against the weights (every id defined before use, every view inside its buffer, every launch
// binding what its kernel declares, the output the size of the logits) while its GPU objects are made.
void WgpuEngine::setup(const Program& program, std::vector<Array>& weights, const std::vector<int64_t>& input_shape,
                       const std::vector<int64_t>& output_shape) {
  WGPUFeatureName f16 = WGPUFeatureName_ShaderF16;
  bool half = needs_f16(program);
  if (half && !wgpuAdapterHasFeature(adapter_, f16))
    fail(MIXER_EDGE_WRONG_DEVICE, "this artifact computes in float16, which the Vulkan device " + name_ +
                                      " cannot (no shader-f16): rebuild it with --precision float32");
  WGPUDeviceDescriptor descriptor{};
  descriptor.requiredFeatureCount = half ? 1 : 0;
  descriptor.requiredFeatures = &f16;
  descriptor.requiredLimits = &limits_;  // the adapter's, as wgpu-py asks (maxStorageBuffersPerShaderStage matters)
  descriptor.uncapturedErrorCallbackInfo.callback = on_error;
  descriptor.uncapturedErrorCallbackInfo.userdata1 = &error_;
  DeviceRequest request;
  WGPURequestDeviceCallbackInfo requested{};
  requested.mode = WGPUCallbackMode_AllowProcessEvents;
  requested.callback = on_device;
  requested.userdata1 = &request;
  wgpuAdapterRequestDevice(adapter_, &descriptor, requested);
  wgpuInstanceProcessEvents(instance_);
  device_ = request.device;
  if (!device_) setup_failed(request.message.empty() ? "no device" : request.message);
  queue_ = wgpuDeviceGetQueue(device_);

  const WGPUBufferUsage storage = WGPUBufferUsage_Storage;
  input_bytes_ = static_cast<uint64_t>(elements(input_shape, 4));
  input_ = buffer(aligned(input_bytes_), storage | WGPUBufferUsage_CopyDst);
  std::unordered_map<int64_t, Value> values{{0, {input_, 0, input_bytes_, "float32"}}};
  const int64_t n_weights = static_cast<int64_t>(weights.size());

  auto upload = [&](const std::string& dtype, const std::vector<uint8_t>& data) -> Value {
    return {buffer(aligned(data.size()), storage, &data), 0, data.size(), dtype};
  };
  auto value = [&](int64_t ref, const std::string& where) -> const Value& {
    if (!values.count(ref) && 1 <= ref && ref <= n_weights) {  // weights reach the GPU when a step first uses them
      Array& weight = weights[ref - 1];
      std::string dtype = stored(weight.data, weight.dtype, source_ + ": weight " + std::to_string(ref));
      values.emplace(ref, upload(dtype, weight.data));
      std::vector<uint8_t>().swap(weight.data);  // on the GPU now
    }
    auto found = values.find(ref);
    if (found == values.end())
      fail(MIXER_EDGE_BAD_ARTIFACT, source_ + " " + where + " uses value " + std::to_string(ref) +
                                        ", which is neither the input (0), a weight (1 to " +
                                        std::to_string(n_weights) +
                                        ") nor made by an earlier step: rebuild the artifact");
    return found->second;
  };

  std::map<std::string, Kernel> kernels;
  for (const auto& source : program.kernels) kernels[source.first] = kernel(source.first, source.second);

  for (size_t i = 0; i < program.steps.size(); ++i) {
    const Step& step = program.steps[i];
    const std::string where = "step " + std::to_string(i) + " (" + step.op + ")";
    if (step.out >= 0 && (step.out <= n_weights || values.count(step.out)))
      fail(MIXER_EDGE_BAD_ARTIFACT, source_ + " " + where + " redefines value " + std::to_string(step.out) +
                                        " (the input or a weight): rebuild the artifact");
    if (step.op == "storage") {
      if (static_cast<uint64_t>(step.bytes) > limits_.maxBufferSize)
        fail(MIXER_EDGE_BAD_ARTIFACT, source_ + " " + where + " allocates " + std::to_string(step.bytes) +
                                          " bytes, more than the Vulkan device's largest buffer (" +
                                          std::to_string(limits_.maxBufferSize) + "): rebuild the artifact");
      WGPUBuffer storage_buffer = buffer(aligned(step.bytes), storage | WGPUBufferUsage_CopySrc);
      values.emplace(step.out, Value{storage_buffer, 0, static_cast<uint64_t>(step.bytes), "uint8"});
    } else if (step.op == "constant") {
      values.emplace(step.out, upload(step.dtype, step.data));
    } else if (step.op == "view") {
      Value src = value(step.src, where);
      std::string dtype = step.dtype.empty() ? src.dtype : step.dtype;
      int64_t size = elements(step.shape, itemsize(dtype));
      if (static_cast<uint64_t>(step.offset + size) > src.bytes)
        fail(MIXER_EDGE_BAD_ARTIFACT, source_ + " " + where + " views " + std::to_string(size) + " bytes at offset " +
                                          std::to_string(step.offset) + " of value " + std::to_string(step.src) +
                                          ", which holds " + std::to_string(src.bytes) + ": rebuild the artifact");
      values.emplace(step.out, Value{src.buffer, src.offset + step.offset, static_cast<uint64_t>(size), dtype});
    } else {
      std::vector<Value> args;
      for (int64_t ref : step.args) args.push_back(value(ref, where));
      for (const Launch& launch : step.launches) {
        const Kernel& kernel = kernels.at(launch.kernel);
        size_t declared = kernel.kinds.size() - 1;
        if (launch.buffers.size() != declared)
          fail(MIXER_EDGE_BAD_ARTIFACT, source_ + " " + where + " binds " + std::to_string(launch.buffers.size()) +
                                            " buffers to kernel " + launch.kernel + ", which declares " +
                                            std::to_string(declared) + ": rebuild the artifact");
        std::vector<Value> bound;
        for (int64_t position : launch.buffers) bound.push_back(args[position]);
        dispatches_.push_back(dispatch(kernel, launch, bound));
      }
    }
  }

  const Value& output = value(program.output, "output");
  logits_bytes_ = static_cast<uint64_t>(elements(output_shape, 4));
  if (output.bytes != logits_bytes_ || output.dtype != "float32")
    fail(MIXER_EDGE_BAD_ARTIFACT, source_ + " output (value " + std::to_string(program.output) + ") is " +
                                      std::to_string(output.bytes) + " bytes of " + output.dtype + ", but the logits " +
                                      list_text(output_shape) + " are " + std::to_string(logits_bytes_) +
                                      " bytes of float32: rebuild the artifact");
  // Copies are in 4-byte units: the region around the logits (inside the buffer, whose size is a multiple of 4).
  output_ = output.buffer;
  copy_offset_ = output.offset / 4 * 4;
  skip_ = output.offset - copy_offset_;
  copy_bytes_ = aligned(skip_ + logits_bytes_);
  staging_ = buffer(copy_bytes_, WGPUBufferUsage_MapRead | WGPUBufferUsage_CopyDst);
  // Recorded once, not run: what wgpu refuses only in a compute pass (a buffer bound both read-only and
  // read_write) is refused here, at load, rather than on the first inference.
  wgpuCommandBufferRelease(commands());
  check();
}

// An inference's commands: every dispatch in one compute pass, then the copy of the logits to the staging buffer.
WGPUCommandBuffer WgpuEngine::commands() {
  WGPUCommandEncoder encoder = wgpuDeviceCreateCommandEncoder(device_, nullptr);
  WGPUComputePassEncoder pass = wgpuCommandEncoderBeginComputePass(encoder, nullptr);
  for (const Dispatch& d : dispatches_) {
    wgpuComputePassEncoderSetPipeline(pass, d.pipeline);
    wgpuComputePassEncoderSetBindGroup(pass, 0, d.group, 0, nullptr);
    wgpuComputePassEncoderDispatchWorkgroups(pass, d.grid[0], d.grid[1], d.grid[2]);
  }
  wgpuComputePassEncoderEnd(pass);
  wgpuComputePassEncoderRelease(pass);
  wgpuCommandEncoderCopyBufferToBuffer(encoder, output_, copy_offset_, staging_, 0, copy_bytes_);
  WGPUCommandBuffer commands = wgpuCommandEncoderFinish(encoder, nullptr);
  wgpuCommandEncoderRelease(encoder);
  return commands;
}

void WgpuEngine::run(const float* input, float* logits) {
  wgpuQueueWriteBuffer(queue_, input_, 0, input, input_bytes_);
  WGPUCommandBuffer recorded = commands();
  if (error_.empty()) wgpuQueueSubmit(queue_, 1, &recorded);  // never an invalid one: wgpu-native aborts on it
  wgpuCommandBufferRelease(recorded);
  if (!error_.empty()) run_failed("");

  Mapping mapping;
  WGPUBufferMapCallbackInfo mapped{};
  mapped.mode = WGPUCallbackMode_AllowProcessEvents;
  mapped.callback = on_mapped;
  mapped.userdata1 = &mapping;
  wgpuBufferMapAsync(staging_, WGPUMapMode_Read, 0, copy_bytes_, mapped);
  for (int polls = 0; !mapping.done && polls < 1000; ++polls) {  // each poll waits for the queue to finish
    wgpuDevicePoll(device_, true, nullptr);
    wgpuInstanceProcessEvents(instance_);
  }
  bool read = mapping.done && mapping.status == WGPUMapAsyncStatus_Success;
  if (read) {
    const void* data = wgpuBufferGetConstMappedRange(staging_, 0, copy_bytes_);
    if (data) std::memcpy(logits, static_cast<const uint8_t*>(data) + skip_, logits_bytes_);
    read = data != nullptr;
    wgpuBufferUnmap(staging_);
  }
  if (!read || !error_.empty()) run_failed(mapping.done ? mapping.message : "the logits were never mapped");
}

void WgpuEngine::run_failed(std::string why) {
  if (!error_.empty()) why.swap(error_);  // wgpu's own error first; error_ is empty again for the next run
  error_.clear();
  fail(MIXER_EDGE_RUNTIME_ERROR, "the Vulkan device " + name_ + " failed running " + source_ + " (" +
                                     safe_text(why.empty() ? "the logits could not be read" : why, 200) +
                                     "): check its Vulkan driver");
}

}  // namespace

std::unique_ptr<Engine> open_wgpu_engine(const Artifact& artifact, std::vector<Array> weights) {
  const std::string source = artifact.path("program.json");
  try {
    Program program = read_program(source);
    auto engine = std::make_unique<WgpuEngine>(source);
    engine->load(program, std::move(weights), artifact.input_shape, artifact.output_shape);
    return engine;
  } catch (const Error&) {
    throw;
  } catch (const std::exception& exc) {  // out of host memory while reading it
    fail(MIXER_EDGE_BAD_ARTIFACT,
         source + " could not be loaded (" + safe_text(exc.what(), 120) + "): rebuild the artifact");
  }
}

}  // namespace mixer_edge
