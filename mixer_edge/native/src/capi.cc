// The C API (include/mixer_edge.h) over the checked artifact and its backend's Engine. No exception leaves
// this file: each becomes a status and one line in mixer_edge_last_error().
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>

#include "engine.h"

#ifndef MIXER_EDGE_VERSION
#define MIXER_EDGE_VERSION "unknown"
#endif

struct mixer_edge_model {
  mixer_edge::Artifact artifact;
  std::unique_ptr<mixer_edge::Engine> engine;
  std::string device;
  mixer_edge_preprocess preprocess;
  std::vector<float> batch_in, batch_out;  // the last, partial batch, padded
};

namespace {

thread_local std::string last_error;

template <typename F>
mixer_edge_status guarded(F&& body) {
  try {
    body();
    last_error.clear();
    return MIXER_EDGE_OK;
  } catch (const mixer_edge::Error& exc) {
    last_error = exc.what();
    return exc.status;
  } catch (const std::bad_alloc&) {
    last_error = "out of memory";
    return MIXER_EDGE_RUNTIME_ERROR;
  } catch (const std::exception& exc) {
    last_error = exc.what();
    return MIXER_EDGE_RUNTIME_ERROR;
  }
}

void require(bool ok, const char* what) {
  if (!ok) mixer_edge::fail(MIXER_EDGE_INVALID_ARGUMENT, what);
}

// The CPUs this process may run on, SMT siblings counted once (as mixer_edge.runtime.physical_cores).
int physical_cores() {
  cpu_set_t cpus;
  if (sched_getaffinity(0, sizeof cpus, &cpus) != 0) return 1;
  std::set<std::string> cores;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (!CPU_ISSET(cpu, &cpus)) continue;
    std::ifstream siblings("/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/thread_siblings_list");
    std::string line;
    cores.insert(siblings && std::getline(siblings, line) ? line : std::to_string(cpu));
  }
  return std::max<int>(1, static_cast<int>(cores.size()));
}

// The engines this library was built with, by backend name.
const std::string& backends() {
  static const std::string names = [] {
    std::string out;
#ifdef MIXER_EDGE_WITH_TVM
    out += " cpu";
#endif
#ifdef MIXER_EDGE_WITH_WGPU
    out += " wgpu";
#endif
#ifdef MIXER_EDGE_WITH_CUDA
    out += " cuda-driver";
#endif
    return out.empty() ? out : out.substr(1);
  }();
  return names;
}

std::unique_ptr<mixer_edge::Engine> open_engine(const mixer_edge::Artifact& artifact, int num_threads) {
#ifdef MIXER_EDGE_WITH_TVM
  if (artifact.backend == "cpu")
    return mixer_edge::open_tvm_engine(artifact, mixer_edge::read_params(artifact), num_threads);
#endif
#ifdef MIXER_EDGE_WITH_WGPU
  if (artifact.backend == "wgpu") return mixer_edge::open_wgpu_engine(artifact, mixer_edge::read_params(artifact));
#endif
#ifdef MIXER_EDGE_WITH_CUDA
  if (artifact.backend == "cuda-driver")
    return mixer_edge::open_cuda_engine(artifact, mixer_edge::read_params(artifact));
#endif
  (void)num_threads;
  mixer_edge::fail(MIXER_EDGE_UNSUPPORTED, artifact.root + " is a " + artifact.backend + " artifact, but this "
                   "libmixer_edge was built with backends: " + (backends().empty() ? std::string("none") : backends()) +
                   ": package this artifact with mixer-edge package");
}

}  // namespace

extern "C" {

const char* mixer_edge_last_error(void) { return last_error.c_str(); }
const char* mixer_edge_version(void) { return MIXER_EDGE_VERSION; }
const char* mixer_edge_backends(void) { return backends().c_str(); }

mixer_edge_status mixer_edge_open(const char* path, const mixer_edge_options* options, mixer_edge_model** model) {
  return guarded([&]() {
    require(path != nullptr && model != nullptr, "mixer_edge_open: path and model must not be NULL");
    *model = nullptr;
    const int threads = options && options->num_threads > 0 ? options->num_threads : 0;
    require(!options || options->num_threads >= 0, "mixer_edge_open: num_threads must be >= 0 (0: every core)");
    // TVM sizes a thread's pool when it first starts; like the Python runtime, every physical core by default
    // (TVM alone would take half the logical CPUs).
    setenv("TVM_NUM_THREADS", std::to_string(threads ? threads : physical_cores()).c_str(), 0);
    auto loaded = std::make_unique<mixer_edge_model>();
    loaded->artifact = mixer_edge::open_artifact(path);
    loaded->engine = open_engine(loaded->artifact, threads);
    loaded->device = loaded->engine->device();
    const auto& a = loaded->artifact;
    loaded->preprocess = mixer_edge_preprocess{static_cast<int>(a.input_shape[1]), static_cast<int>(a.input_shape[2]),
                                               static_cast<int>(a.input_shape[3]), a.mean.data(), a.std.data(),
                                               a.resample.c_str(), a.crop_pct};
    *model = loaded.release();
  });
}

void mixer_edge_close(mixer_edge_model* model) { delete model; }

void mixer_edge_input_shape(const mixer_edge_model* model, int64_t shape[4]) {
  if (model && shape) std::copy(model->artifact.input_shape.begin(), model->artifact.input_shape.end(), shape);
}

int mixer_edge_num_classes(const mixer_edge_model* model) {
  return model ? static_cast<int>(model->artifact.output_shape[1]) : 0;
}

const char* mixer_edge_label(const mixer_edge_model* model, int index) {
  if (!model || index < 0 || index >= static_cast<int>(model->artifact.labels.size())) return nullptr;
  return model->artifact.labels[index].c_str();
}

const mixer_edge_preprocess* mixer_edge_preprocessing(const mixer_edge_model* model) {
  return model ? &model->preprocess : nullptr;
}

const char* mixer_edge_backend(const mixer_edge_model* model) { return model ? model->artifact.backend.c_str() : ""; }
const char* mixer_edge_device(const mixer_edge_model* model) { return model ? model->device.c_str() : ""; }

mixer_edge_status mixer_edge_run(mixer_edge_model* model, const float* input, int64_t count, float* logits) {
  return guarded([&]() {
    require(model && input && logits, "mixer_edge_run: model, input and logits must not be NULL");
    require(count >= 1, "mixer_edge_run: count must be >= 1");
    const auto& a = model->artifact;
    const int64_t batch = a.input_shape[0], classes = a.output_shape[1];
    const int64_t image = a.input_shape[1] * a.input_shape[2] * a.input_shape[3];
    // The artifact's batch is static: run whole batches in place, the last one padded with zeros.
    for (int64_t start = 0; start < count; start += batch) {
      const int64_t n = std::min(batch, count - start);
      if (n == batch) {
        model->engine->run(input + start * image, logits + start * classes);
        continue;
      }
      model->batch_in.assign(batch * image, 0.0f);
      model->batch_out.resize(batch * classes);
      std::copy(input + start * image, input + (start + n) * image, model->batch_in.begin());
      model->engine->run(model->batch_in.data(), model->batch_out.data());
      std::copy(model->batch_out.begin(), model->batch_out.begin() + n * classes, logits + start * classes);
    }
    if (!std::all_of(logits, logits + count * classes, [](float v) { return std::isfinite(v); }))
      mixer_edge::fail(MIXER_EDGE_RUNTIME_ERROR, "the artifact " + a.root + " computed NaN or Inf logits on these "
                       "inputs: its weights are not finite or it overflows; rebuild it from a finite checkpoint");
  });
}

}  // extern "C"
