// gpt2rt's TensorRT shim: the few TensorRT 10 calls gpt2rt makes, behind extern "C" functions that
// Rust calls (src/backend/tensorrt/runtime.rs). Compiled by build.rs against the TensorRT 10
// headers only when the `tensorrt` cargo feature is on.
//
// Nothing here links against nvinfer: the runtime is created through the
// `createInferRuntime_INTERNAL` pointer that Rust looked up in the library it loaded at run time,
// and every other call goes through the objects TensorRT returns (the public classes are inline
// wrappers over virtual interfaces). Only methods present since TensorRT 10.0 are used, so a shim
// built with newer 10.x headers runs on any 10.x runtime. No C++ exception crosses into Rust.

#include <NvInferRuntime.h>

#include <cstddef>
#include <cstdint>
#include <exception>

namespace
{

using LogFn = void (*)(void* user, int32_t severity, char const* message);
using CreateRuntimeFn = void* (*) (void* logger, int32_t version);

//! Forwards TensorRT's messages to Rust. TensorRT keeps using the first logger it was given, so the
//! one runtime this shim creates lives as long as the process.
class Logger final : public nvinfer1::ILogger
{
public:
    Logger(LogFn fn, void* user)
        : mFn(fn)
        , mUser(user)
    {
    }

    void log(Severity severity, nvinfer1::AsciiChar const* msg) noexcept override
    {
        if (mFn != nullptr)
        {
            mFn(mUser, static_cast<int32_t>(severity), msg != nullptr ? msg : "");
        }
    }

private:
    LogFn mFn;
    void* mUser;
};

struct Runtime
{
    Logger logger;
    nvinfer1::IRuntime* runtime;
};

void report(Runtime* rt, char const* what) noexcept
{
    if (rt != nullptr)
    {
        rt->logger.log(nvinfer1::ILogger::Severity::kERROR, what);
    }
}

void copyDims(nvinfer1::Dims const& dims, int64_t* out) noexcept
{
    for (int32_t i = 0; i < nvinfer1::Dims::MAX_DIMS; ++i)
    {
        out[i] = i < dims.nbDims ? dims.d[i] : 0;
    }
}

} // namespace

extern "C"
{

    //! One I/O tensor of an engine, as Rust reads it (`TensorDesc` in runtime.rs).
    struct gpt2rt_trt_tensor
    {
        char const* name; //!< valid while the engine lives
        int32_t is_input;
        int32_t dtype; //!< nvinfer1::DataType
        int32_t rank;  //!< -1 when TensorRT reports none
        int64_t dims[8];
        int32_t linear;
        int32_t on_device;
        int32_t shape_tensor;
    };

    //! NV_TENSORRT_VERSION of the headers this shim was compiled against.
    int32_t gpt2rt_trt_header_version(void) noexcept
    {
        return static_cast<int32_t>(NV_TENSORRT_VERSION);
    }

    void* gpt2rt_trt_runtime_create(CreateRuntimeFn create, LogFn log, void* user) noexcept
    {
        Runtime* rt = nullptr;
        try
        {
            rt = new Runtime{Logger(log, user), nullptr};
            rt->runtime = static_cast<nvinfer1::IRuntime*>(
                create(static_cast<nvinfer1::ILogger*>(&rt->logger), static_cast<int32_t>(NV_TENSORRT_VERSION)));
        }
        catch (std::exception const& e)
        {
            report(rt, e.what());
        }
        catch (...)
        {
            report(rt, "unknown C++ exception while creating the TensorRT runtime");
        }
        if (rt != nullptr && rt->runtime == nullptr)
        {
            delete rt;
            rt = nullptr;
        }
        return rt;
    }

    void* gpt2rt_trt_engine_deserialize(void* runtime, void const* blob, size_t size) noexcept
    {
        auto* rt = static_cast<Runtime*>(runtime);
        try
        {
            return rt->runtime->deserializeCudaEngine(blob, size);
        }
        catch (...)
        {
            report(rt, "C++ exception while deserializing the engine");
            return nullptr;
        }
    }

    void gpt2rt_trt_engine_destroy(void* engine) noexcept
    {
        try
        {
            delete static_cast<nvinfer1::ICudaEngine*>(engine);
        }
        catch (...)
        {
        }
    }

    int32_t gpt2rt_trt_engine_num_io(void* engine) noexcept
    {
        return static_cast<nvinfer1::ICudaEngine*>(engine)->getNbIOTensors();
    }

    int32_t gpt2rt_trt_engine_num_profiles(void* engine) noexcept
    {
        return static_cast<nvinfer1::ICudaEngine*>(engine)->getNbOptimizationProfiles();
    }

    //! Describes I/O tensor `index`; 0 on success, -1 when there is no such tensor.
    int32_t gpt2rt_trt_engine_io(void* engine, int32_t index, gpt2rt_trt_tensor* out) noexcept
    {
        auto* e = static_cast<nvinfer1::ICudaEngine*>(engine);
        char const* name = e->getIOTensorName(index);
        if (name == nullptr)
        {
            return -1;
        }
        out->name = name;
        out->is_input = e->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT ? 1 : 0;
        out->dtype = static_cast<int32_t>(e->getTensorDataType(name));
        nvinfer1::Dims dims = e->getTensorShape(name);
        out->rank = dims.nbDims;
        copyDims(dims, out->dims);
        out->linear = e->getTensorFormat(name) == nvinfer1::TensorFormat::kLINEAR ? 1 : 0;
        out->on_device = e->getTensorLocation(name) == nvinfer1::TensorLocation::kDEVICE ? 1 : 0;
        out->shape_tensor = e->isShapeInferenceIO(name) ? 1 : 0;
        return 0;
    }

    //! min (which 0), opt (1) or max (2) shape of input `name` in `profile`; returns the rank, -1 on
    //! failure.
    int32_t gpt2rt_trt_engine_profile_shape(
        void* engine, char const* name, int32_t profile, int32_t which, int64_t* dims) noexcept
    {
        auto selector = which == 0 ? nvinfer1::OptProfileSelector::kMIN
            : which == 1           ? nvinfer1::OptProfileSelector::kOPT
                                   : nvinfer1::OptProfileSelector::kMAX;
        nvinfer1::Dims d = static_cast<nvinfer1::ICudaEngine*>(engine)->getProfileShape(name, profile, selector);
        copyDims(d, dims);
        return d.nbDims;
    }

    void* gpt2rt_trt_context_create(void* engine) noexcept
    {
        try
        {
            return static_cast<nvinfer1::ICudaEngine*>(engine)->createExecutionContext(
                nvinfer1::ExecutionContextAllocationStrategy::kSTATIC);
        }
        catch (...)
        {
            return nullptr;
        }
    }

    void gpt2rt_trt_context_destroy(void* context) noexcept
    {
        try
        {
            delete static_cast<nvinfer1::IExecutionContext*>(context);
        }
        catch (...)
        {
        }
    }

    //! 1 on success. Must come before the input shapes of the new profile are set.
    int32_t gpt2rt_trt_context_set_profile(void* context, int32_t profile, void* stream) noexcept
    {
        return static_cast<nvinfer1::IExecutionContext*>(context)->setOptimizationProfileAsync(
                   profile, static_cast<cudaStream_t>(stream))
            ? 1
            : 0;
    }

    int32_t gpt2rt_trt_context_set_input_shape(void* context, char const* name, int32_t rank, int64_t const* dims) noexcept
    {
        if (rank < 0 || rank > nvinfer1::Dims::MAX_DIMS)
        {
            return 0;
        }
        nvinfer1::Dims d{};
        d.nbDims = rank;
        for (int32_t i = 0; i < rank; ++i)
        {
            d.d[i] = dims[i];
        }
        return static_cast<nvinfer1::IExecutionContext*>(context)->setInputShape(name, d) ? 1 : 0;
    }

    //! The shape TensorRT computes for `name` under the current input shapes; returns the rank (-1
    //! when it cannot).
    int32_t gpt2rt_trt_context_tensor_shape(void* context, char const* name, int64_t* dims) noexcept
    {
        nvinfer1::Dims d = static_cast<nvinfer1::IExecutionContext*>(context)->getTensorShape(name);
        copyDims(d, dims);
        return d.nbDims;
    }

    int32_t gpt2rt_trt_context_set_address(void* context, char const* name, void* address) noexcept
    {
        return static_cast<nvinfer1::IExecutionContext*>(context)->setTensorAddress(name, address) ? 1 : 0;
    }

    int32_t gpt2rt_trt_context_enqueue(void* context, void* stream) noexcept
    {
        return static_cast<nvinfer1::IExecutionContext*>(context)->enqueueV3(static_cast<cudaStream_t>(stream)) ? 1
                                                                                                                : 0;
    }

} // extern "C"
