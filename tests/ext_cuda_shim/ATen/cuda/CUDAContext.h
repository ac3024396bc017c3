// Stand-in for torch's ATen/cuda/CUDAContext.h, for syntax-checking csrc/ops_cuda.cpp against a
// CPU build of torch (whose c10/cuda headers need a generated cuda_cmake_macros.h and the CUDA
// math libraries' headers). Declarations only, with the signatures of the real c10/cuda/
// CUDAStream.h; c10/macros (included by ATen) makes at::cuda see c10::cuda, as in torch.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/Stream.h>
#include <cuda_runtime.h>

namespace c10::cuda {

class CUDAStream {
 public:
  explicit CUDAStream(Stream stream);
  operator cudaStream_t() const;
  operator Stream() const;
  DeviceIndex device_index() const;
  Device device() const;
  cudaStream_t stream() const;
  Stream unwrap() const;
};

CUDAStream getCurrentCUDAStream(DeviceIndex device_index = -1);
CUDAStream getDefaultCUDAStream(DeviceIndex device_index = -1);

}  // namespace c10::cuda
