// mixer-edge-run: classify images or a .npy batch with a compiled artifact, through the C API alone.
//
//   mixer-edge-run ARTIFACT [--input x.npy|image ...] [--top 5] [--show 5] [--bench N [--json]] [--threads N]
//                  [--save out.npy]
//
// Without --input or --bench, checks the artifact and says what it is. Prints the top classes of each input; with
// --bench N, the time to open the artifact and to run the first
// inference, then the median and p90 of N more, and the peak resident memory; with --json as well, those as one
// JSON object (and the wall-clock time of the first result, for a parent timing the spawn). Bad input: one line
// on stderr, exit code 2. This file is the example to copy: everything it does with a model is in mixer_edge.h.
#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <numeric>
#include <string>
#include <vector>

#define STB_IMAGE_IMPLEMENTATION
#define STBI_NO_HDR
#define STBI_NO_LINEAR
#include <stb/stb_image.h>
#define STB_IMAGE_RESIZE_IMPLEMENTATION
#include <stb/stb_image_resize.h>

#include "mixer_edge.h"
#include "npy.h"

namespace {

struct Usage : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string artifact, save;
  std::vector<std::string> inputs;
  int top = 5, show = 5, bench = 0, threads = 0;
  bool json = false;
};

int integer(const std::string& option, const char* value, int low, int high) {
  char* end = nullptr;
  const long v = value ? std::strtol(value, &end, 10) : 0;
  if (!value || *end || v < low || v > high)
    throw Usage(option + " takes an integer from " + std::to_string(low) + " to " + std::to_string(high));
  return static_cast<int>(v);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const char* value = i + 1 < argc ? argv[i + 1] : nullptr;
    if (arg == "--input" && value) o.inputs.push_back(argv[++i]);
    else if (arg == "--save" && value) o.save = argv[++i];
    else if (arg == "--top") o.top = integer(arg, value, 1, 1 << 20), ++i;
    else if (arg == "--show") o.show = integer(arg, value, 0, 1 << 30), ++i;
    else if (arg == "--bench") o.bench = integer(arg, value, 1, 1 << 24), ++i;
    else if (arg == "--threads") o.threads = integer(arg, value, 0, 4096), ++i;
    else if (arg == "--json") o.json = true;
    else if (arg.rfind("--", 0) == 0) throw Usage("unknown option " + arg + " (options: --input --top --show --bench --json --threads --save)");
    else if (o.artifact.empty()) o.artifact = arg;
    else throw Usage("one artifact only (got " + o.artifact + " and " + arg + ")");
  }
  if (o.artifact.empty())
    throw Usage("usage: mixer-edge-run ARTIFACT [--input x.npy|image ...] [--top N] [--show N] [--bench N [--json]] "
                "[--threads N] [--save logits.npy]");
  if (o.json && !o.bench) throw Usage("--json prints what --bench measures: add --bench N");
  return o;
}

// A float32 .npy of (N, C, H, W) or (C, H, W) model inputs, appended to `batch`.
void read_array(const std::string& path, const int64_t shape[4], std::vector<float>& batch) {
  std::ifstream f(path, std::ios::binary);
  const std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  mixer_edge::npy::View view;
  try {
    view = mixer_edge::npy::parse(path, bytes.data(), bytes.size());
  } catch (const std::exception& exc) {
    throw Usage("array file " + path + " could not be read (" + exc.what() + "): save it with numpy.save");
  }
  std::vector<int64_t> dims = view.shape;
  if (dims.size() == 3) dims.insert(dims.begin(), 1);
  const std::string expected = "(N, " + std::to_string(shape[1]) + ", " + std::to_string(shape[2]) + ", " +
                               std::to_string(shape[3]) + ")";
  if (view.dtype != "float32" || dims.size() != 4 || !std::equal(dims.begin() + 1, dims.end(), shape + 1))
    throw Usage(path + " is " + view.dtype + " of another shape; the model expects float32 " + expected +
                ": pass arrays of that shape");
  const float* values = reinterpret_cast<const float*>(view.data);
  batch.insert(batch.end(), values, values + view.nbytes / sizeof(float));
}

// Where an image of width x height is resized to and where the crop starts (rw, rh, left, top), as the Python
// runtime's Preprocess.crop_box: with crop_pct < 1 the shorter side to floor(side / crop_pct), then a center crop
// (torchvision's rounding, half to even); crop_pct 1: the whole image to the model's size.
void crop_box(const mixer_edge_preprocess& pre, int width, int height, int box[4]) {
  if (!(pre.crop_pct < 1.0)) {
    box[0] = pre.width, box[1] = pre.height, box[2] = box[3] = 0;
    return;
  }
  const long scale_h = static_cast<long>(std::floor(pre.height / pre.crop_pct));
  const long scale_w = static_cast<long>(std::floor(pre.width / pre.crop_pct));
  long rw, rh;
  if (static_cast<double>(height) * scale_w <= static_cast<double>(width) * scale_h)
    rh = scale_h, rw = static_cast<long>(static_cast<double>(scale_h * width) / height);
  else
    rw = scale_w, rh = static_cast<long>(static_cast<double>(scale_w * height) / width);
  rw = std::max<long>(rw, pre.width), rh = std::max<long>(rh, pre.height);
  box[0] = static_cast<int>(rw), box[1] = static_cast<int>(rh);
  box[2] = static_cast<int>(std::nearbyint((rw - pre.width) / 2.0));
  box[3] = static_cast<int>(std::nearbyint((rh - pre.height) / 2.0));
}

// One image: decoded (alpha over black), grey as PIL's ITU-R 601 luma, resized (and center-cropped) with the
// preprocessing's filter, scaled to [0, 1], normalised. Close to the Python runtime's PIL path, not bit-identical:
// use .npy for that.
void read_image(const std::string& path, const mixer_edge_preprocess& pre, std::vector<float>& batch) {
  if (pre.channels != 1 && pre.channels != 3)
    throw Usage("image " + path + " cannot feed a " + std::to_string(pre.channels) + "-channel model: pass a .npy array");
  int width = 0, height = 0, found = 0;
  unsigned char* rgba = stbi_load(path.c_str(), &width, &height, &found, 4);
  if (!rgba)
    throw Usage("image " + path + " could not be read (" + stbi_failure_reason() + "): pass a PNG, JPEG, BMP or GIF file, "
                "or a .npy array");
  std::vector<float> plane(static_cast<size_t>(width) * height * pre.channels);
  for (size_t i = 0; i < static_cast<size_t>(width) * height; ++i) {
    const unsigned char* px = rgba + 4 * i;
    const float a = px[3] / 255.0f, r = px[0] * a, g = px[1] * a, b = px[2] * a;
    if (pre.channels == 1) plane[i] = std::round((r * 19595 + g * 38470 + b * 7471) / 65536.0f);
    else plane[3 * i] = r, plane[3 * i + 1] = g, plane[3 * i + 2] = b;
  }
  stbi_image_free(rgba);
  const std::string resample = pre.resample;
  const stbir_filter filter = resample == "nearest" || resample == "box" ? STBIR_FILTER_BOX
                              : resample == "bilinear"                   ? STBIR_FILTER_TRIANGLE
                                                                         : STBIR_FILTER_CATMULLROM;
  int box[4];
  crop_box(pre, width, height, box);
  std::vector<float> resized(static_cast<size_t>(box[0]) * box[1] * pre.channels);
  stbir_resize_float_generic(plane.data(), width, height, 0, resized.data(), box[0], box[1], 0, pre.channels,
                             STBIR_ALPHA_CHANNEL_NONE, 0, STBIR_EDGE_CLAMP, filter, STBIR_COLORSPACE_LINEAR, nullptr);
  for (int c = 0; c < pre.channels; ++c)  // HWC -> CHW, the crop only
    for (int y = box[3]; y < box[3] + pre.height; ++y)
      for (int x = box[2]; x < box[2] + pre.width; ++x) {
        const float value = resized[(static_cast<size_t>(y) * box[0] + x) * pre.channels + c];
        const float unit = std::min(1.0f, std::max(0.0f, value / 255.0f));
        batch.push_back((unit - pre.mean[c]) / pre.std[c]);
      }
}

// This process's peak resident memory in MiB: VmHWM, which (unlike getrusage's ru_maxrss) starts afresh at exec,
// so a runner started by a large process does not report that process's peak.
double peak_resident_mib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtod(line.c_str() + 6, nullptr) / 1024.0;
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return peak_resident_mib();
}

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

// The wall-clock time (CLOCK_REALTIME) in ms since the epoch: comparable across processes, unlike steady_clock.
double unix_ms() {
  timespec now{};
  clock_gettime(CLOCK_REALTIME, &now);
  return now.tv_sec * 1e3 + now.tv_nsec / 1e6;
}

// `text` as a JSON string literal.
std::string json_string(const std::string& text) {
  std::string out = "\"";
  for (const unsigned char c : text) {
    if (c == '"' || c == '\\') out += '\\', out += static_cast<char>(c);
    else if (c < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
      out += escaped;
    } else out += static_cast<char>(c);
  }
  return out + "\"";
}

double percentile(std::vector<double> v, double q) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(std::ceil(q * v.size())) - (q > 0 ? 1 : 0))];
}

int run(const Options& o) {
  const auto opening = std::chrono::steady_clock::now();
  mixer_edge_options options{o.threads};
  mixer_edge_model* model = nullptr;
  if (mixer_edge_open(o.artifact.c_str(), &options, &model) != MIXER_EDGE_OK) throw Usage(mixer_edge_last_error());
  const double open_ms = ms_since(opening);
  std::unique_ptr<mixer_edge_model, void (*)(mixer_edge_model*)> owned(model, mixer_edge_close);
  int64_t shape[4];
  mixer_edge_input_shape(model, shape);
  const int classes = mixer_edge_num_classes(model);
  if (o.inputs.empty() && !o.bench) {
    std::printf("%s: checked; %s backend on %s, input float32 [%lld, %lld, %lld, %lld], %d classes\n",
                o.artifact.c_str(), mixer_edge_backend(model), mixer_edge_device(model), static_cast<long long>(shape[0]),
                static_cast<long long>(shape[1]), static_cast<long long>(shape[2]), static_cast<long long>(shape[3]),
                classes);
    return 0;
  }
  std::vector<float> inputs;
  for (const std::string& path : o.inputs) {
    if (!std::ifstream(path))
      throw Usage("input " + path + " does not exist or cannot be opened: pass an image or a .npy array");
    const std::string ext = path.substr(path.find_last_of('.') + 1);
    if (ext == "npy") read_array(path, shape, inputs);
    else read_image(path, *mixer_edge_preprocessing(model), inputs);
  }
  const int64_t image = shape[1] * shape[2] * shape[3];
  if (inputs.empty()) inputs.assign(shape[0] * image, 0.0f);  // --bench alone: one batch of zeros
  const int64_t count = static_cast<int64_t>(inputs.size()) / image;
  std::vector<float> logits(count * classes);

  const auto first = std::chrono::steady_clock::now();
  if (mixer_edge_run(model, inputs.data(), count, logits.data()) != MIXER_EDGE_OK)
    throw std::runtime_error(mixer_edge_last_error());
  const double first_ms = ms_since(first);
  const double first_result_unix_ms = unix_ms();
  if (!o.inputs.empty()) {
    for (int64_t i = 0; i < std::min<int64_t>(count, o.show); ++i) {
      std::vector<int> order(classes);
      std::iota(order.begin(), order.end(), 0);
      const float* row = &logits[i * classes];
      const int top = std::min(o.top, classes);
      std::partial_sort(order.begin(), order.begin() + top, order.end(), [&](int a, int b) { return row[a] > row[b]; });
      std::printf("#%lld:", static_cast<long long>(i));
      for (int k = 0; k < top; ++k) std::printf("%s %s (%.2f)", k ? "," : "", mixer_edge_label(model, order[k]), row[order[k]]);
      std::printf("\n");
    }
  }
  if (!o.save.empty() && !mixer_edge::npy::write_float32(o.save, {count, classes}, logits.data()))
    throw Usage("--save " + o.save + " could not be written: pass a path in a writable directory");
  if (o.bench) {
    std::vector<double> times;
    for (int i = 0; i < o.bench; ++i) {
      const auto start = std::chrono::steady_clock::now();
      if (mixer_edge_run(model, inputs.data(), std::min<int64_t>(count, shape[0]), logits.data()) != MIXER_EDGE_OK)
        throw std::runtime_error(mixer_edge_last_error());
      times.push_back(ms_since(start));
    }
    if (o.json) {
      std::printf("{\"backend\": %s, \"device\": %s, \"batch\": %lld, \"open_ms\": %.3f, \"first_inference_ms\": %.3f, "
                  "\"runs\": %d, \"median_ms\": %.4f, \"p90_ms\": %.4f, \"peak_rss_mib\": %.2f, "
                  "\"first_result_unix_ms\": %.3f}\n", json_string(mixer_edge_backend(model)).c_str(),
                  json_string(mixer_edge_device(model)).c_str(), static_cast<long long>(shape[0]), open_ms, first_ms,
                  o.bench, percentile(times, 0.5), percentile(times, 0.9), peak_resident_mib(),
                  first_result_unix_ms);
      return 0;
    }
    std::printf("%s on %s, batch %lld: open %.1f ms, first inference %.2f ms, then %d runs: median %.3f ms, p90 %.3f "
                "ms; peak resident memory %.1f MiB\n", mixer_edge_backend(model), mixer_edge_device(model),
                static_cast<long long>(shape[0]), open_ms, first_ms, o.bench, percentile(times, 0.5),
                percentile(times, 0.9), peak_resident_mib());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const Usage& exc) {
    std::fprintf(stderr, "mixer-edge-run: error: %s\n", exc.what());
    return 2;
  } catch (const std::exception& exc) {
    std::fprintf(stderr, "mixer-edge-run: error: %s\n", exc.what());
    return 1;
  }
}
