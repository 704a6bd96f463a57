// The `cpu` backend natively: model.so's Relax VM executable run by TVM's C++ runtime (libtvm_runtime.so +
// libtvm_ffi.so), the weights resident as TVM tensors, as mixer_edge/backends/native.py does in Python.
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/container/tensor.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "engine.h"

namespace mixer_edge {
namespace {

namespace ffi = tvm::ffi;

constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR
constexpr int kAffinityBig = 1;      // TVM's ThreadGroup::kBig: its default thread placement

DLDataType dl_dtype(const std::string& dtype) {
  if (dtype == "bool") return DLDataType{kDLBool, 8, 1};
  const uint8_t code = dtype[0] == 'f' ? kDLFloat : dtype[0] == 'u' ? kDLUInt : kDLInt;
  const size_t digits = dtype.find_first_of("0123456789");
  return DLDataType{code, static_cast<uint8_t>(std::stoi(dtype.substr(digits))), 1};
}

// CPU memory for TVM tensors, 64-byte aligned as TVM's own CPU allocator aligns it.
struct AlignedAlloc {
  void AllocData(DLTensor* tensor) {
    if (posix_memalign(&tensor->data, 64, std::max<size_t>(64, ffi::GetDataSize(*tensor))) != 0) throw std::bad_alloc();
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

ffi::Tensor on_cpu(const std::vector<int64_t>& shape, const std::string& dtype, const void* data, size_t nbytes) {
  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::Shape(shape), dl_dtype(dtype), DLDevice{kDLCPU, 0});
  std::memcpy(tensor.data_ptr(), data, nbytes);
  return tensor;
}

class TvmEngine : public Engine {
 public:
  TvmEngine(const Artifact& artifact, std::vector<Array> weights, int num_threads)
      : input_shape_(artifact.input_shape), output_shape_(artifact.output_shape), num_threads_(num_threads) {
    try {
      ffi::Module library = ffi::Module::LoadFromFile(artifact.path("model.so"));
      vm_ = library->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
      vm_.value()->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
      main_ = vm_.value()->GetFunction("main").value();
      for (Array& w : weights) {  // each freed once copied: the weights are never held twice over
        args_.push_back(on_cpu(w.shape, w.dtype, w.data.data(), w.data.size()));
        std::vector<uint8_t>().swap(w.data);
      }
    } catch (const std::exception& exc) {
      fail(MIXER_EDGE_BAD_ARTIFACT, artifact.path("model.so") + " could not be loaded by TVM's runtime (" +
                                        first_line(exc.what()) + "): rebuild the artifact");
    }
    input_bytes_ = 4;
    for (int64_t d : input_shape_) input_bytes_ *= d;
    output_bytes_ = 4 * output_shape_[0] * output_shape_[1];
    input_ = on_cpu(input_shape_, "float32", std::vector<uint8_t>(input_bytes_).data(), input_bytes_);
  }

  void run(const float* input, float* logits) override {
    configure_threads();
    try {
      std::memcpy(input_.data_ptr(), input, input_bytes_);
      std::vector<ffi::AnyView> views{ffi::AnyView(input_)};
      for (const auto& w : args_) views.emplace_back(w);
      ffi::Any out;
      main_.CallPacked(views.data(), static_cast<int32_t>(views.size()), &out);
      ffi::Tensor result = out.cast<ffi::Tensor>();
      const DLTensor& t = *result.GetDLTensorPtr();
      if (ffi::GetDataSize(t) != output_bytes_ || t.dtype.code != kDLFloat || t.dtype.bits != 32 ||
          !result.IsContiguous() || t.device.device_type != kDLCPU)
        fail(MIXER_EDGE_RUNTIME_ERROR, "the model returned " + std::to_string(ffi::GetDataSize(t)) +
                                           " bytes that are not the float32 logits: rebuild the artifact");
      std::memcpy(logits, static_cast<const char*>(t.data) + t.byte_offset, output_bytes_);
    } catch (const Error&) {
      throw;
    } catch (const std::exception& exc) {
      fail(MIXER_EDGE_RUNTIME_ERROR, "TVM's runtime failed running the model (" + first_line(exc.what()) + ")");
    }
  }

  std::string device() const override { return "CPU (TVM runtime)"; }

 private:
  // TVM's thread pool belongs to the calling thread: size it there, once per thread.
  void configure_threads() {
    thread_local int configured = -1;
    if (num_threads_ <= 0 || configured == num_threads_) return;
    static const auto config = ffi::Function::GetGlobalRequired("runtime.config_threadpool");
    config(kAffinityBig, num_threads_);
    configured = num_threads_;
  }

  static std::string first_line(const std::string& text) {
    std::string line = text.substr(0, text.find('\n'));
    return line.size() > 200 ? line.substr(0, 200) + "..." : line;
  }

  std::vector<int64_t> input_shape_, output_shape_;
  int num_threads_;
  size_t input_bytes_ = 0, output_bytes_ = 0;
  ffi::Optional<ffi::Module> vm_;  // kept alive beside its main
  ffi::Function main_;
  std::vector<ffi::Tensor> args_;
  ffi::Tensor input_;
};

}  // namespace

std::unique_ptr<Engine> open_tvm_engine(const Artifact& artifact, std::vector<Array> weights, int num_threads) {
  return std::make_unique<TvmEngine>(artifact, std::move(weights), num_threads);
}

}  // namespace mixer_edge
