// The cuda-driver backend: cuda_plan.json (a CUDA artifact's host side as data) replayed on the GPU through
// the CUDA driver API alone, as mixer_edge/cuda_driver.py does in Python (the same checks, in the same order,
// in the same words). libcuda.so.1 is opened at run time (dlopen), so this library links nothing of CUDA (no
// libcudart, NVRTC or TVM) and opens on a machine without a GPU, where it refuses in one line.
//
// At load, in this order: the plan is read and checked against the weights (every field, every value id
// defined before use, every view inside its source, every buffer parameter, the output); then the driver,
// its version and the GPU's compute capability; only then is kernels.fatbin loaded. The weights the plan uses
// (as they are: any dtype) and its constants are uploaded and its storages allocated, once. An inference
// copies the input in, launches every kernel in order on the model's stream and copies the logits out:
// nothing is allocated.
#include <dlfcn.h>  // dlopen, dlsym, dlerror (POSIX; the NDK's libdl)

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine.h"
#include "json_fields.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "weights and constants are uploaded as little-endian bytes"
#endif

namespace mixer_edge {
namespace {

using Json = nlohmann::json;

// ---- the CUDA driver API, declared here (the device has no cuda.h): every type, value and symbol name as
// ---- CUDA 13.0's cuda.h has it, each unchanged since CUDA 11.4 (JetPack 5) -------------------------------

using CUresult = int;                   // enum cudaError_enum (an int-sized enum)
using CUdevice = int;                   // typedef int CUdevice_v1; typedef CUdevice_v1 CUdevice
using CUdeviceptr = unsigned long long;  // CUdeviceptr_v2 where _WIN64 or __LP64__ (every host CUDA runs on)
using CUcontext = struct CUctx_st*;     // typedef struct CUctx_st *CUcontext
using CUmodule = struct CUmod_st*;      // typedef struct CUmod_st *CUmodule
using CUfunction = struct CUfunc_st*;   // typedef struct CUfunc_st *CUfunction
using CUstream = struct CUstream_st*;   // typedef struct CUstream_st *CUstream
using CUdevice_attribute = int;         // enum CUdevice_attribute_enum
using CUfunction_attribute = int;       // enum CUfunction_attribute_enum

constexpr CUresult CUDA_SUCCESS = 0;                                   // cudaError_enum
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;                       // cudaError_enum
constexpr CUresult CUDA_ERROR_NOT_FOUND = 500;                         // cudaError_enum
constexpr CUdevice_attribute CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75;        // CUdevice_attribute_enum
constexpr CUdevice_attribute CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76;        // CUdevice_attribute_enum
constexpr CUfunction_attribute CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8;    // CUfunction_attribute_enum
constexpr unsigned int CU_STREAM_NON_BLOCKING = 0x1;                   // CUstream_flags_enum

constexpr int64_t kDefaultSharedBytes = 48 * 1024;  // dynamic shared memory a kernel may use without opting in

// The driver: opened once per process and never closed (unloading libcuda under its own threads is unsafe).
struct Driver {
  void* library = nullptr;
  std::string error;    // why libcuda.so.1 could not be opened
  std::string missing;  // the first function it lacks ("" if none)
  // Each with its prototype in cuda.h; the name dlsym looks up is the ABI name the header's #define maps to.
  CUresult (*cuInit)(unsigned int flags) = nullptr;
  CUresult (*cuDriverGetVersion)(int* version) = nullptr;
  CUresult (*cuDeviceGetCount)(int* count) = nullptr;
  CUresult (*cuDeviceGet)(CUdevice* device, int ordinal) = nullptr;
  CUresult (*cuDeviceGetAttribute)(int* value, CUdevice_attribute attribute, CUdevice device) = nullptr;
  CUresult (*cuDeviceGetName)(char* name, int length, CUdevice device) = nullptr;
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext* context, CUdevice device) = nullptr;
  CUresult (*cuDevicePrimaryCtxRelease)(CUdevice device) = nullptr;       // cuDevicePrimaryCtxRelease_v2
  CUresult (*cuCtxPushCurrent)(CUcontext context) = nullptr;              // cuCtxPushCurrent_v2
  CUresult (*cuCtxPopCurrent)(CUcontext* context) = nullptr;              // cuCtxPopCurrent_v2
  CUresult (*cuModuleLoadData)(CUmodule* module, const void* image) = nullptr;
  CUresult (*cuModuleUnload)(CUmodule module) = nullptr;
  CUresult (*cuModuleGetFunction)(CUfunction* function, CUmodule module, const char* name) = nullptr;
  CUresult (*cuFuncSetAttribute)(CUfunction function, CUfunction_attribute attribute, int value) = nullptr;
  CUresult (*cuMemAlloc)(CUdeviceptr* pointer, size_t bytes) = nullptr;   // cuMemAlloc_v2
  CUresult (*cuMemFree)(CUdeviceptr pointer) = nullptr;                   // cuMemFree_v2
  CUresult (*cuMemcpyHtoD)(CUdeviceptr to, const void* from, size_t bytes) = nullptr;  // cuMemcpyHtoD_v2
  CUresult (*cuMemcpyHtoDAsync)(CUdeviceptr to, const void* from, size_t bytes,
                                CUstream stream) = nullptr;               // cuMemcpyHtoDAsync_v2
  CUresult (*cuMemcpyDtoHAsync)(void* to, CUdeviceptr from, size_t bytes,
                                CUstream stream) = nullptr;               // cuMemcpyDtoHAsync_v2
  CUresult (*cuStreamCreate)(CUstream* stream, unsigned int flags) = nullptr;
  CUresult (*cuStreamDestroy)(CUstream stream) = nullptr;                 // cuStreamDestroy_v2
  CUresult (*cuStreamSynchronize)(CUstream stream) = nullptr;
  CUresult (*cuLaunchKernel)(CUfunction function, unsigned int grid_x, unsigned int grid_y, unsigned int grid_z,
                             unsigned int block_x, unsigned int block_y, unsigned int block_z,
                             unsigned int shared_bytes, CUstream stream, void** params, void** extra) = nullptr;
  CUresult (*cuGetErrorString)(CUresult error, const char** text) = nullptr;

  template <typename F>
  void bind(F& function, const char* name) {
    function = reinterpret_cast<F>(dlsym(library, name));
    if (!function && missing.empty()) missing = name;
  }
};

const Driver& driver() {
  static const Driver loaded = [] {
    Driver cu;
    dlerror();
    cu.library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!cu.library) {
      const char* why = dlerror();
      cu.error = safe_text(why ? why : "libcuda.so.1 could not be opened", 160);
      return cu;
    }
    cu.bind(cu.cuInit, "cuInit");
    cu.bind(cu.cuDriverGetVersion, "cuDriverGetVersion");
    cu.bind(cu.cuDeviceGetCount, "cuDeviceGetCount");
    cu.bind(cu.cuDeviceGet, "cuDeviceGet");
    cu.bind(cu.cuDeviceGetAttribute, "cuDeviceGetAttribute");
    cu.bind(cu.cuDeviceGetName, "cuDeviceGetName");
    cu.bind(cu.cuGetErrorString, "cuGetErrorString");
    cu.bind(cu.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    cu.bind(cu.cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2");
    cu.bind(cu.cuCtxPushCurrent, "cuCtxPushCurrent_v2");
    cu.bind(cu.cuCtxPopCurrent, "cuCtxPopCurrent_v2");
    cu.bind(cu.cuModuleLoadData, "cuModuleLoadData");
    cu.bind(cu.cuModuleUnload, "cuModuleUnload");
    cu.bind(cu.cuModuleGetFunction, "cuModuleGetFunction");
    cu.bind(cu.cuFuncSetAttribute, "cuFuncSetAttribute");
    cu.bind(cu.cuMemAlloc, "cuMemAlloc_v2");
    cu.bind(cu.cuMemFree, "cuMemFree_v2");
    cu.bind(cu.cuMemcpyHtoD, "cuMemcpyHtoD_v2");
    cu.bind(cu.cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2");
    cu.bind(cu.cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2");
    cu.bind(cu.cuStreamCreate, "cuStreamCreate");
    cu.bind(cu.cuStreamDestroy, "cuStreamDestroy_v2");
    cu.bind(cu.cuStreamSynchronize, "cuStreamSynchronize");
    cu.bind(cu.cuLaunchKernel, "cuLaunchKernel");
    return cu;
  }();
  return loaded;
}

// A CUresult in words, with its number (cuda_driver.Driver.error_text).
std::string why(const Driver& cu, CUresult result) {
  const char* text = nullptr;
  const std::string number = "CUDA error " + std::to_string(result);
  if (cu.cuGetErrorString && cu.cuGetErrorString(result, &text) == CUDA_SUCCESS && text && *text)
    return safe_text(text, 120) + ", " + number;
  return number;
}

std::string version_text(int64_t version) {  // 12060 -> "12.6"
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

// ---- cuda_plan.json -------------------------------------------------------------------------------------

constexpr int64_t kPlanFormat = 1;
constexpr int64_t kMaxId = (int64_t{1} << 31) - 1;  // value ids, launch sizes (unsigned int in CUDA)
constexpr int64_t kMaxBytes = int64_t{1} << 40;

struct Launch {
  std::string kernel;
  std::vector<uint64_t> slots;                     // one 8-byte slot per parameter, in order: scalars written here
  std::vector<std::pair<size_t, size_t>> buffers;  // (slot, position in the call's args): pointers, at load
  std::array<unsigned int, 3> grid{}, block{};
  unsigned int shared_bytes = 0;
};

struct Step {
  std::string op;                // storage, view, constant, call
  int64_t out = -1;              // storage, view, constant
  int64_t bytes = 0;             // storage
  int64_t src = 0, offset = 0;   // view
  std::vector<int64_t> shape;    // view, constant
  std::string dtype;             // view ("": src's), constant
  std::vector<uint8_t> data;     // constant, decoded
  std::vector<int64_t> args;     // call
  std::vector<Launch> launches;  // call
};

struct Allocation {  // one cuMemAlloc: the input, a weight, a storage or a constant
  uint64_t bytes;
  std::vector<uint8_t>* data;  // uploaded at load, then freed (null: the input, a storage)
  std::string what;            // "weight 3", for messages
};

struct Ref {  // a device pointer: allocation `allocation`'s plus `offset`
  size_t allocation;
  uint64_t offset;
};

struct Plan {
  int64_t driver_version_min = 0;
  std::vector<Step> steps;              // owns the constants' bytes until they are uploaded
  std::vector<Allocation> allocations;  // [0] the input, [1..N] the weights, then storages and constants
  std::vector<Launch> launches;         // every launch, in order
  std::vector<std::vector<std::pair<size_t, Ref>>> pointers;  // per launch: (slot, the buffer it points at)
  Ref output{0, 0};
  uint64_t input_bytes = 0, output_bytes = 0;
};

// Reads cuda_plan.json and checks it against the weights; every refusal is one line naming the field, then
// "rebuild the artifact". Nothing here touches the GPU.
class PlanReader : private JsonFields<Json> {
 public:
  using JsonFields::JsonFields;

  Plan read(const Json& doc, std::vector<Array>& weights, const std::vector<int64_t>& input_shape,
            const std::vector<int64_t>& output_shape) const {
    record(doc, "", {"format", "driver_version_min", "steps", "output"});
    if (!doc["format"].is_number_integer() || doc["format"] != kPlanFormat)
      bad("format", "should be " + std::to_string(kPlanFormat) + " (the plan format this runtime reads)",
          &doc["format"]);
    Plan plan;
    plan.driver_version_min = integer(doc["driver_version_min"], "driver_version_min", 0, kMaxId);
    const Json& steps = array(doc["steps"], "steps");
    for (size_t i = 0; i < steps.size(); ++i) plan.steps.push_back(step(steps[i], "steps." + std::to_string(i)));
    const int64_t output = integer(doc["output"], "output", 0, kMaxId);
    std::set<int64_t> created;  // CudaPlan._consistent
    for (size_t i = 0; i < plan.steps.size(); ++i) {
      const int64_t out = plan.steps[i].out;
      if (out >= 0 && !created.insert(out).second) {
        Json shown = out;
        bad("steps." + std::to_string(i) + ".out", "reuses the id of an earlier step's value", &shown);
      }
    }
    schedule(plan, output, weights, input_shape, output_shape);
    return plan;
  }

 private:
  struct Value {  // a tensor in device memory, while the plan is checked
    Ref at;
    uint64_t bytes;
    std::string dtype;  // a storage's is uint8
  };

  // The layout ("<file> step 3 (view) ...", as cuda_driver.layout words it); the structure is refuse()'s (as
  // parse() words a schema error: "<file>: field 'x': ...").
  [[noreturn]] void wrong(const std::string& what) const {
    fail(MIXER_EDGE_BAD_ARTIFACT, source() + " " + what + ": rebuild the artifact");
  }

  std::string dtype(const Json& j, const std::string& field) const {
    std::string name = string(j, field);
    if (!itemsize(name))
      bad(field, "should be a numpy dtype (float16, float32, float64, int8 to int64, uint8 to uint64, bool)", &j);
    return name;
  }

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
      step.args = integers(j["args"], at(path, "args"), 0, kMaxId);
      const Json& launches = array(j["launches"], at(path, "launches"));
      for (size_t i = 0; i < launches.size(); ++i)
        step.launches.push_back(launch(launches[i], at(path, "launches." + std::to_string(i)), step.args.size()));
    } else if (step.op == "storage") {
      record(j, path, {"op", "out", "bytes"});
      step.out = integer(j["out"], at(path, "out"), 0, kMaxId);
      step.bytes = integer(j["bytes"], at(path, "bytes"), 1, kMaxBytes);
    } else if (step.op == "view") {
      record(j, path, {"op", "out", "src", "offset", "shape"}, {"dtype"});
      step.out = integer(j["out"], at(path, "out"), 0, kMaxId);
      step.src = integer(j["src"], at(path, "src"), 0, kMaxId);
      step.offset = integer(j["offset"], at(path, "offset"), 0, kMaxBytes);
      step.shape = shape(j["shape"], at(path, "shape"));
      if (j.contains("dtype") && !j["dtype"].is_null())  // absent or null: src's
        step.dtype = dtype(j["dtype"], at(path, "dtype"));
    } else {
      record(j, path, {"op", "out", "dtype", "shape", "data"});
      step.out = integer(j["out"], at(path, "out"), 0, kMaxId);
      step.dtype = dtype(j["dtype"], at(path, "dtype"));
      step.shape = shape(j["shape"], at(path, "shape"));
      step.data = constant(string(j["data"], at(path, "data")), step.dtype, step.shape, at(path, "data"));
    }
    return step;
  }

  Launch launch(const Json& j, const std::string& field, size_t args) const {
    record(j, field, {"kernel", "params", "grid", "block", "shared_bytes"});
    Launch launch;
    launch.kernel = string(j["kernel"], at(field, "kernel"));
    if (!identifier(launch.kernel))
      bad(at(field, "kernel"), "should match pattern '^[A-Za-z_][A-Za-z0-9_]*$'", &j["kernel"]);
    const Json& params = array(j["params"], at(field, "params"));
    if (params.size() > 1024) bad(at(field, "params"), "should hold at most 1024 parameters");
    for (size_t i = 0; i < params.size(); ++i) param(params[i], at(field, "params." + std::to_string(i)), args, launch);
    for (const char* dims : {"grid", "block"}) {
      std::vector<int64_t> sizes = integers(j[dims], at(field, dims), 1, kMaxId);
      if (sizes.size() != 3) bad(at(field, dims), "should hold 3 integers (x, y, z)", &j[dims]);
      auto& out = std::string(dims) == "grid" ? launch.grid : launch.block;
      for (int d = 0; d < 3; ++d) out[d] = static_cast<unsigned int>(sizes[d]);
    }
    launch.shared_bytes = static_cast<unsigned int>(integer(j["shared_bytes"], at(field, "shared_bytes"), 0, kMaxId));
    return launch;
  }

  // A kernel parameter into its own 8-byte slot: ["buffer", k] (a device pointer, filled in at load),
  // ["i32", an int32], ["i64", an int64] or ["f32", a finite float32].
  void param(const Json& j, const std::string& field, size_t args, Launch& launch) const {
    uint64_t slot = 0;
    const std::string kind = j.is_array() && j.size() == 2 && j[0].is_string() ? j[0].get<std::string>() : "";
    const Json* v = kind.empty() ? nullptr : &j[1];
    auto is_int = [&](int64_t lo, int64_t hi) {
      if (!v->is_number_integer()) return false;
      if (v->is_number_unsigned()) return v->get<uint64_t>() <= static_cast<uint64_t>(hi);
      return v->get<int64_t>() >= lo && v->get<int64_t>() <= hi;
    };
    if (kind == "buffer" && is_int(0, kMaxId)) {
      const int64_t position = v->get<int64_t>();
      if (position >= static_cast<int64_t>(args))
        bad(field, "passes argument " + std::to_string(position) + " but the call has " + std::to_string(args) +
                       " args", &j);
      launch.buffers.emplace_back(launch.slots.size(), static_cast<size_t>(position));
    } else if (kind == "i32" && is_int(INT32_MIN, INT32_MAX)) {
      int32_t value = static_cast<int32_t>(v->get<int64_t>());
      std::memcpy(&slot, &value, sizeof value);
    } else if (kind == "i64" && is_int(INT64_MIN, INT64_MAX)) {
      int64_t value = v->get<int64_t>();
      std::memcpy(&slot, &value, sizeof value);
    } else if (kind == "f32" && v->is_number() && std::isfinite(v->get<double>()) &&
               std::fabs(v->get<double>()) <= std::numeric_limits<float>::max()) {
      float value = static_cast<float>(v->get<double>());
      std::memcpy(&slot, &value, sizeof value);
    } else {
      bad(field, "a kernel parameter is [\"buffer\", a position in the call's args], [\"i32\", an int32], "
                 "[\"i64\", an int64] or [\"f32\", a finite float32]", &j);
    }
    launch.slots.push_back(slot);
  }

  // The plan against the values it runs on (cuda_driver.layout): every id defined before use, every view
  // inside its source and aligned for its dtype, the output float32 of the logits' size. Lays out the
  // allocations: the input, then each weight as a step first uses it (unused ones never reach the GPU), each
  // storage and constant.
  void schedule(Plan& plan, int64_t output, std::vector<Array>& weights, const std::vector<int64_t>& input_shape,
                const std::vector<int64_t>& output_shape) const {
    std::unordered_map<int64_t, Value> values;  // its references stay valid as it grows
    const int64_t n_weights = static_cast<int64_t>(weights.size());
    plan.input_bytes = static_cast<uint64_t>(elements(input_shape, 4));
    plan.allocations.push_back({plan.input_bytes, nullptr, "the input"});
    values.emplace(0, Value{{0, 0}, plan.input_bytes, "float32"});
    auto value = [&](int64_t ref, const std::string& where) -> const Value& {
      if (!values.count(ref) && 1 <= ref && ref <= n_weights) {
        Array& weight = weights[ref - 1];
        if (!itemsize(weight.dtype))
          wrong("weight " + std::to_string(ref) + " (" + safe_text(weight.name, 80) + ") is " +
                safe_text(weight.dtype, 40) + ", not a number array");
        values.emplace(ref, Value{{plan.allocations.size(), 0}, weight.data.size(), weight.dtype});
        plan.allocations.push_back({weight.data.size(), &weight.data, "weight " + std::to_string(ref)});
      }
      auto found = values.find(ref);
      if (found == values.end())
        wrong(where + " uses value " + std::to_string(ref) + ", which is neither the input (0), a weight (1 to " +
              std::to_string(n_weights) + ") nor made by an earlier step");
      return found->second;
    };

    for (size_t i = 0; i < plan.steps.size(); ++i) {
      Step& step = plan.steps[i];
      const std::string where = "step " + std::to_string(i) + " (" + step.op + ")";
      if (step.out >= 0 && (step.out <= n_weights || values.count(step.out)))
        wrong(where + " redefines value " + std::to_string(step.out) + " (the input or a weight)");
      if (step.op == "storage") {
        values.emplace(step.out, Value{{plan.allocations.size(), 0}, static_cast<uint64_t>(step.bytes), "uint8"});
        plan.allocations.push_back({static_cast<uint64_t>(step.bytes), nullptr, "storage " + std::to_string(step.out)});
      } else if (step.op == "constant") {
        values.emplace(step.out, Value{{plan.allocations.size(), 0}, step.data.size(), step.dtype});
        plan.allocations.push_back({step.data.size(), &step.data, "constant " + std::to_string(step.out)});
      } else if (step.op == "view") {
        const Value src = value(step.src, where);
        const std::string dtype = step.dtype.empty() ? src.dtype : step.dtype;
        const int64_t size = elements(step.shape, itemsize(dtype));
        if (static_cast<uint64_t>(step.offset) + static_cast<uint64_t>(size) > src.bytes)
          wrong(where + " views " + std::to_string(size) + " bytes at offset " + std::to_string(step.offset) +
                " of value " + std::to_string(step.src) + ", which holds " + std::to_string(src.bytes));
        const uint64_t offset = src.at.offset + static_cast<uint64_t>(step.offset);
        if (offset % itemsize(dtype))  // cuMemAlloc's pointers are 256-byte aligned: the offset decides
          wrong(where + " puts a " + dtype + " view at byte " + std::to_string(offset) +
                " of its buffer, not a multiple of " + std::to_string(itemsize(dtype)));
        values.emplace(step.out, Value{{src.at.allocation, offset}, static_cast<uint64_t>(size), dtype});
      } else {
        std::vector<Ref> args;
        for (int64_t ref : step.args) args.push_back(value(ref, where).at);
        for (Launch& launch : step.launches) {
          std::vector<std::pair<size_t, Ref>> pointers;
          for (const auto& buffer : launch.buffers) pointers.emplace_back(buffer.first, args[buffer.second]);
          plan.pointers.push_back(std::move(pointers));
          plan.launches.push_back(std::move(launch));
        }
        step.launches.clear();
      }
    }

    const Value& out = value(output, "output");
    plan.output_bytes = static_cast<uint64_t>(elements(output_shape, 4));
    if (out.bytes != plan.output_bytes || out.dtype != "float32")
      wrong("output (value " + std::to_string(output) + ") is " + std::to_string(out.bytes) + " bytes of " +
            out.dtype + ", but the logits " + list_text(output_shape) + " are " +
            std::to_string(plan.output_bytes) + " bytes of float32");
    plan.output = out.at;
  }
};

Plan read_plan(const std::string& path, std::vector<Array>& weights, const Artifact& artifact) {
  return read_json<Json>(path, [&](const Json& doc) {
    return PlanReader(path).read(doc, weights, artifact.input_shape, artifact.output_shape);
  });
}

// ---- the manifest's CUDA fields and the GPU ------------------------------------------------------------

struct Target {
  std::string preset;
  std::vector<std::string> archs;  // target.device.cuda_archs: "sm_87", ...
  bool ptx = false;                // target.device.cuda_ptx
};

Target read_target(const Artifact& artifact) {
  const std::string source = artifact.path("manifest.json");
  auto wrong = [&](const std::string& field, const std::string& expected, const Json* got) {
    fail(MIXER_EDGE_BAD_ARTIFACT, source + ": field '" + field + "': " + expected +
                                      (got ? ", got " + safe_text(got->dump(-1, ' ', false,
                                                                            Json::error_handler_t::replace), 60)
                                           : std::string(" (missing)")) +
                                      ": rebuild the artifact");
  };
  auto member = [](const Json* parent, const char* key) -> const Json* {
    return parent && parent->is_object() && parent->contains(key) ? &(*parent)[key] : nullptr;
  };
  const Json* target = member(&artifact.manifest, "target");
  const Json* device = member(target, "device");
  Target out;
  const Json* preset = member(target, "preset");
  if (!preset || !preset->is_string()) wrong("target.preset", "should be a string", preset);
  out.preset = safe_text(preset->get<std::string>(), 80);
  const Json* archs = member(device, "cuda_archs");
  if (archs && !archs->is_null()) {
    if (!archs->is_array() || !std::all_of(archs->begin(), archs->end(), [](const Json& a) { return a.is_string(); }))
      wrong("target.device.cuda_archs", "should be a list of strings", archs);
    for (const Json& arch : *archs) out.archs.push_back(arch.get<std::string>());
  }
  const Json* ptx = member(device, "cuda_ptx");
  if (ptx && !ptx->is_null()) {
    if (!ptx->is_boolean()) wrong("target.device.cuda_ptx", "should be a boolean", ptx);
    out.ptx = ptx->get<bool>();
  }
  return out;
}

struct Gpu {
  CUdevice device = 0;
  std::string name, sm;  // "Orin", "sm_87"
  int driver = 0;        // cuDriverGetVersion: 12060
};

// The first GPU, if the driver, its version and the GPU's compute capability fit the artifact; one line if not.
Gpu open_gpu(const Driver& cu, const Target& target, int64_t driver_min) {
  auto none = [&](const std::string& reason) {
    fail(MIXER_EDGE_WRONG_DEVICE, "artifact target " + target.preset + " needs an NVIDIA GPU and its driver "
                                  "(libcuda.so.1), and this machine has none (" + reason + "): run it on the device");
  };
  auto too_old = [&](int64_t needed, const std::string& have) {
    fail(MIXER_EDGE_WRONG_DEVICE, "artifact target " + target.preset + " needs a CUDA " + version_text(needed) +
                                  " driver or newer; this one is " + have + ": update the driver (JetPack) or "
                                  "rebuild with an older CUDA");
  };  // cuda_driver.check_gpu's words, throughout
  if (!cu.library) none(cu.error);
  if (!cu.missing.empty())  // every function used is in CUDA 11.4's driver
    fail(MIXER_EDGE_WRONG_DEVICE, "artifact target " + target.preset + " needs a CUDA 11.4 driver or newer; this "
                                  "libcuda.so.1 has no " + cu.missing + ": update the driver (JetPack)");
  CUresult result = cu.cuInit(0);
  if (result != CUDA_SUCCESS) none("cuInit: " + why(cu, result));
  int count = 0;
  result = cu.cuDeviceGetCount(&count);
  if (result != CUDA_SUCCESS) none("cuDeviceGetCount: " + why(cu, result));
  if (count < 1) none("cuDeviceGetCount: no CUDA device");

  Gpu gpu;
  result = cu.cuDriverGetVersion(&gpu.driver);
  if (result != CUDA_SUCCESS) none("cuDriverGetVersion: " + why(cu, result));
  if (gpu.driver < driver_min) too_old(driver_min, version_text(gpu.driver));

  int major = 0, minor = 0;
  char name[256] = {};
  if ((result = cu.cuDeviceGet(&gpu.device, 0)) != CUDA_SUCCESS ||
      (result = cu.cuDeviceGetAttribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, gpu.device)) !=
          CUDA_SUCCESS ||
      (result = cu.cuDeviceGetAttribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, gpu.device)) !=
          CUDA_SUCCESS ||
      (result = cu.cuDeviceGetName(name, sizeof name - 1, gpu.device)) != CUDA_SUCCESS)
    none("device 0: " + why(cu, result));
  gpu.name = safe_text(name, 120);
  gpu.sm = "sm_" + std::to_string(major) + std::to_string(minor);
  if (!target.ptx && std::find(target.archs.begin(), target.archs.end(), gpu.sm) == target.archs.end()) {
    std::string archs;
    for (const std::string& arch : target.archs) archs += (archs.empty() ? "" : ", ") + safe_text(arch, 20);
    fail(MIXER_EDGE_WRONG_DEVICE, "this artifact has " + (archs.empty() ? std::string("no GPU") : archs) +
                                      " code; this GPU is " + gpu.sm + ": rebuild for a preset with " + gpu.sm +
                                      " in its cuda_archs");
  }
  return gpu;
}

// kernels.fatbin's bytes, 8-byte aligned and zero-terminated (as cuModuleLoadData reads a fatbin or PTX).
std::vector<uint64_t> read_image(const std::string& path) {
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) fail(MIXER_EDGE_BAD_ARTIFACT, path + " could not be read (" + std::strerror(errno) + "): copy the "
                                                  "artifact again");
  const std::streamoff size = file.tellg();
  std::vector<uint64_t> image(size > 0 ? static_cast<size_t>(size) / 8 + 1 : 1, 0);
  file.seekg(0);
  if (size < 0 || !file.read(reinterpret_cast<char*>(image.data()), size))
    fail(MIXER_EDGE_BAD_ARTIFACT, path + " could not be read: copy the artifact again");
  return image;
}

// ---- the engine -----------------------------------------------------------------------------------------

// The model's context current on this thread while it lives; the caller's own current context after.
class Current {
 public:
  Current(const Driver& cu, CUcontext context) : cu_(cu), result_(cu.cuCtxPushCurrent(context)) {}
  ~Current() {
    CUcontext popped;
    if (result_ == CUDA_SUCCESS) cu_.cuCtxPopCurrent(&popped);
  }
  Current(const Current&) = delete;
  Current& operator=(const Current&) = delete;
  CUresult result() const { return result_; }

 private:
  const Driver& cu_;
  CUresult result_;
};

class CudaEngine final : public Engine {
 public:
  CudaEngine(const Driver& cu, Gpu gpu, std::string source)
      : cu_(cu), gpu_(std::move(gpu)), source_(std::move(source)) {}
  ~CudaEngine() override;
  CudaEngine(const CudaEngine&) = delete;
  CudaEngine& operator=(const CudaEngine&) = delete;

  // Everything happens here, not in the constructor: if it throws, the destructor still frees what exists.
  void load(Plan& plan, const std::string& fatbin);
  void run(const float* input, float* logits) override;
  std::string device() const override {
    return gpu_.name + " (" + gpu_.sm + ", CUDA driver " + version_text(gpu_.driver) + ")";
  }

 private:
  struct Kernel {  // a launch, ready for cuLaunchKernel
    CUfunction function;
    std::string name;
    std::array<unsigned int, 3> grid, block;
    unsigned int shared_bytes;
    std::vector<uint64_t> slots;
    std::vector<void*> params;  // into slots
  };

  [[noreturn]] void load_failed(const std::string& what, CUresult result) const;
  [[noreturn]] void run_failed(CUresult result, const std::string& where);

  const Driver& cu_;
  Gpu gpu_;
  std::string source_;  // cuda_plan.json, for messages
  CUcontext context_ = nullptr;
  CUmodule module_ = nullptr;
  CUstream stream_ = nullptr;
  std::vector<CUdeviceptr> memory_;  // every allocation, as the plan lays them out
  std::vector<Kernel> kernels_;
  CUdeviceptr input_ = 0, output_ = 0;
  size_t input_bytes_ = 0, output_bytes_ = 0;
};

CudaEngine::~CudaEngine() {
  if (!context_) return;
  {
    Current current(cu_, context_);
    if (current.result() == CUDA_SUCCESS) {
      if (stream_) {
        cu_.cuStreamSynchronize(stream_);  // a failed run may have left work queued
        cu_.cuStreamDestroy(stream_);
      }
      for (CUdeviceptr pointer : memory_)
        if (pointer) cu_.cuMemFree(pointer);
      if (module_) cu_.cuModuleUnload(module_);
    }
  }
  cu_.cuDevicePrimaryCtxRelease(gpu_.device);
}

// Setting the plan up failed: "<what> failed (<why>)", as cuda_driver.Driver.check words it, then the fix.
void CudaEngine::load_failed(const std::string& what, CUresult result) const {
  const bool memory = result == CUDA_ERROR_OUT_OF_MEMORY;
  fail(MIXER_EDGE_RUNTIME_ERROR, what + " failed (" + why(cu_, result) + "): " +
                                     (memory ? "free GPU memory or build with a smaller batch"
                                             : "check the GPU and its driver"));
}

void CudaEngine::load(Plan& plan, const std::string& fatbin) {
  CUresult result = cu_.cuDevicePrimaryCtxRetain(&context_, gpu_.device);
  if (result != CUDA_SUCCESS) {
    context_ = nullptr;
    load_failed("cuDevicePrimaryCtxRetain", result);
  }
  Current current(cu_, context_);
  if (current.result() != CUDA_SUCCESS) load_failed("cuCtxPushCurrent", current.result());
  if ((result = cu_.cuStreamCreate(&stream_, CU_STREAM_NON_BLOCKING)) != CUDA_SUCCESS) {
    stream_ = nullptr;
    load_failed("cuStreamCreate", result);
  }

  std::vector<uint64_t> image = read_image(fatbin);
  result = cu_.cuModuleLoadData(&module_, image.data());
  if (result != CUDA_SUCCESS) {
    module_ = nullptr;
    fail(MIXER_EDGE_BAD_ARTIFACT, "loading " + fatbin + " on the " + gpu_.name + " (" + gpu_.sm + ") failed (" +
                                      why(cu_, result) + "): rebuild the artifact");
  }
  std::vector<uint64_t>().swap(image);

  // Every kernel the plan launches, and the dynamic shared memory each needs beyond the default 48 KiB.
  std::map<std::string, std::pair<CUfunction, unsigned int>> functions;
  for (const Launch& launch : plan.launches) {
    auto found = functions.find(launch.kernel);
    if (found == functions.end()) {
      CUfunction function = nullptr;
      result = cu_.cuModuleGetFunction(&function, module_, launch.kernel.c_str());
      if (result == CUDA_ERROR_NOT_FOUND)  // as cuda_driver words it: the file's name alone
        fail(MIXER_EDGE_BAD_ARTIFACT, "kernels.fatbin has no kernel " + launch.kernel + ": rebuild the artifact");
      if (result != CUDA_SUCCESS) load_failed("cuModuleGetFunction " + safe_text(launch.kernel, 80), result);
      found = functions.emplace(launch.kernel, std::make_pair(function, 0u)).first;
    }
    found->second.second = std::max(found->second.second, launch.shared_bytes);
  }
  for (const auto& item : functions) {
    if (item.second.second <= kDefaultSharedBytes) continue;
    result = cu_.cuFuncSetAttribute(item.second.first, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                    static_cast<int>(item.second.second));
    if (result != CUDA_SUCCESS)
      fail(MIXER_EDGE_WRONG_DEVICE, "raising kernel " + item.first + "'s dynamic shared memory to " +
                                        std::to_string(item.second.second) + " bytes failed (" + why(cu_, result) +
                                        "): rebuild for this GPU's preset");
  }

  // Device memory: the input, every weight (as is: no dtype conversion), storage and constant, uploaded once.
  for (Allocation& allocation : plan.allocations) {
    CUdeviceptr pointer = 0;
    if ((result = cu_.cuMemAlloc(&pointer, std::max<uint64_t>(allocation.bytes, 1))) != CUDA_SUCCESS)
      load_failed("cuMemAlloc of " + std::to_string(allocation.bytes) + " bytes for " + allocation.what, result);
    memory_.push_back(pointer);
    if (!allocation.data) continue;
    if (!allocation.data->empty() &&
        (result = cu_.cuMemcpyHtoD(pointer, allocation.data->data(), allocation.data->size())) != CUDA_SUCCESS)
      load_failed("cuMemcpyHtoD of " + allocation.what, result);
    std::vector<uint8_t>().swap(*allocation.data);  // on the GPU now: the weights are never held twice over
  }
  // cuMemcpyHtoD from pageable memory may return before its DMA lands, and the model's (non-blocking) stream
  // does not wait on the legacy default stream: wait for the uploads here, once.
  if ((result = cu_.cuStreamSynchronize(nullptr)) != CUDA_SUCCESS) load_failed("cuStreamSynchronize", result);
  input_ = memory_[0];
  input_bytes_ = plan.input_bytes;
  output_ = memory_[plan.output.allocation] + plan.output.offset;
  output_bytes_ = plan.output_bytes;

  kernels_.reserve(plan.launches.size());
  for (size_t i = 0; i < plan.launches.size(); ++i) {
    Launch& launch = plan.launches[i];
    for (const auto& pointer : plan.pointers[i]) {
      CUdeviceptr address = memory_[pointer.second.allocation] + pointer.second.offset;
      std::memcpy(&launch.slots[pointer.first], &address, sizeof address);
    }
    kernels_.push_back(Kernel{functions.at(launch.kernel).first, launch.kernel, launch.grid, launch.block,
                              launch.shared_bytes, std::move(launch.slots), {}});
    Kernel& kernel = kernels_.back();
    for (uint64_t& slot : kernel.slots) kernel.params.push_back(&slot);  // the slots never move again
  }
}

void CudaEngine::run(const float* input, float* logits) {
  Current current(cu_, context_);
  if (current.result() != CUDA_SUCCESS) run_failed(current.result(), "");
  CUresult result = cu_.cuMemcpyHtoDAsync(input_, input, input_bytes_, stream_);
  if (result != CUDA_SUCCESS) run_failed(result, "copying the input");
  for (Kernel& k : kernels_) {
    result = cu_.cuLaunchKernel(k.function, k.grid[0], k.grid[1], k.grid[2], k.block[0], k.block[1], k.block[2],
                                k.shared_bytes, stream_, k.params.empty() ? nullptr : k.params.data(), nullptr);
    if (result != CUDA_SUCCESS) run_failed(result, "launching kernel " + k.name);
  }
  if ((result = cu_.cuMemcpyDtoHAsync(logits, output_, output_bytes_, stream_)) != CUDA_SUCCESS)
    run_failed(result, "copying the logits");
  if ((result = cu_.cuStreamSynchronize(stream_)) != CUDA_SUCCESS) run_failed(result, "");
}

void CudaEngine::run_failed(CUresult result, const std::string& where) {
  if (stream_) cu_.cuStreamSynchronize(stream_);  // nothing left queued behind the error
  fail(MIXER_EDGE_RUNTIME_ERROR, "the GPU failed running " + source_ + " (" + (where.empty() ? "" : where + ": ") +
                                     why(cu_, result) + "): check the GPU and its driver, or rebuild the artifact");
}

}  // namespace

std::unique_ptr<Engine> open_cuda_engine(const Artifact& artifact, std::vector<Array> weights) {
  const std::string source = artifact.path("cuda_plan.json");
  try {
    const Target target = read_target(artifact);
    Plan plan = read_plan(source, weights, artifact);  // all of it checked before the driver is opened
    Gpu gpu = open_gpu(driver(), target, plan.driver_version_min);
    auto engine = std::make_unique<CudaEngine>(driver(), std::move(gpu), source);
    engine->load(plan, artifact.path("kernels.fatbin"));
    return engine;
  } catch (const Error&) {
    throw;
  } catch (const std::bad_alloc&) {  // the C API says "out of memory"
    throw;
  } catch (const std::exception& exc) {  // anything else while reading it: still one line
    fail(MIXER_EDGE_BAD_ARTIFACT,
         source + " could not be loaded (" + safe_text(exc.what(), 120) + "): rebuild the artifact");
  }
}

}  // namespace mixer_edge
