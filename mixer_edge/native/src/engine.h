// Inside the native runtime: the checked artifact, its weights, and one Engine per backend.
#ifndef MIXER_EDGE_ENGINE_H_
#define MIXER_EDGE_ENGINE_H_

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "mixer_edge.h"

namespace mixer_edge {

// Every failure inside the runtime: a status and one line (the C API returns both).
struct Error : std::runtime_error {
  Error(mixer_edge_status status, const std::string& message) : std::runtime_error(message), status(status) {}
  mixer_edge_status status;
};

// `text` from an artifact fit for one terminal line: control characters escaped, at most `limit` characters.
std::string safe_text(const std::string& text, size_t limit = 200);

[[noreturn]] inline void fail(mixer_edge_status status, const std::string& message) { throw Error(status, message); }

// One array of params.npz: its numpy dtype name ("float32", "int8", ...), shape and little-endian bytes.
struct Array {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;
  int64_t size() const;  // elements
};

// An artifact directory whose manifest, files and device requirements passed every check (artifact.cc).
struct Artifact {
  std::string root;                   // the directory, as given
  nlohmann::json manifest;            // manifest.json as written
  std::string kind;                   // target.device.kind: "cpu", "cuda", "vulkan"
  std::string backend;                // the runner: "cpu", "cuda", "cuda-driver", "tvm-vulkan", "wgpu"
  std::vector<int64_t> input_shape;   // [batch, channels, height, width]
  std::vector<int64_t> output_shape;  // [batch, classes]
  std::vector<std::string> labels;
  std::vector<std::string> params;    // weight names, in the order the model takes them
  std::vector<float> mean, std;
  std::string resample;
  double crop_pct = 1.0;              // preprocess.crop_pct; absent (older artifacts): 1, no crop
  std::string path(const std::string& file) const { return root + "/" + file; }
};

// Checks artifact directory `root` (format version, digest, fields, every file's sha256, device) and
// returns it; throws Error with the Python loader's message otherwise.
Artifact open_artifact(const std::string& root);
// The weights of params.npz in manifest order (refused: missing, pickled or non-numeric arrays).
std::vector<Array> read_params(const Artifact& artifact);

// A model loaded on its device: runs one batch (input_shape) into logits (output_shape).
class Engine {
 public:
  virtual ~Engine() = default;
  virtual void run(const float* input, float* logits) = 0;
  virtual std::string device() const = 0;  // in words, for messages
};

std::unique_ptr<Engine> open_tvm_engine(const Artifact& artifact, std::vector<Array> weights, int num_threads);
std::unique_ptr<Engine> open_wgpu_engine(const Artifact& artifact, std::vector<Array> weights);
std::unique_ptr<Engine> open_cuda_engine(const Artifact& artifact, std::vector<Array> weights);

}  // namespace mixer_edge

#endif  // MIXER_EDGE_ENGINE_H_
