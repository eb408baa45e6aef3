using System.Globalization;
using Google.Protobuf;
using Google.Protobuf.WellKnownTypes;
using Google.Rpc;
using Grpc.Core;
using Model = UffdGrpc.Mm;

namespace UffdGrpc.Server.Mapping;

/// <summary>
/// The one table that maps an errno of the model to a gRPC status, and the status details
/// every failed call carries: <c>google.rpc.ErrorInfo</c> (reason = errno name, domain =
/// <see cref="Domain"/>, metadata errno = number) and the RPC's own response message with
/// the partial result (for example <c>UffdioCopyResponse.copy</c>), so a client can resume.
/// </summary>
public static class ErrnoStatus
{
    /// <summary>ErrorInfo.domain of a kernel errno.</summary>
    public const string Domain = "uffd.linux";

    /// <summary>The status code for <paramref name="errno"/> (settled once; see README "Errors").</summary>
    public static StatusCode CodeOf(Model.Errno errno) => errno switch
    {
        Model.Errno.OK => StatusCode.OK,
        Model.Errno.EINVAL => StatusCode.InvalidArgument,
        Model.Errno.EEXIST => StatusCode.AlreadyExists,
        Model.Errno.ENOENT or Model.Errno.ESRCH or Model.Errno.EBADF => StatusCode.NotFound,
        Model.Errno.EAGAIN => StatusCode.Aborted,
        Model.Errno.EPERM or Model.Errno.EACCES => StatusCode.PermissionDenied,
        Model.Errno.EBUSY => StatusCode.FailedPrecondition,
        Model.Errno.EFAULT => StatusCode.OutOfRange,
        Model.Errno.ENOMEM or Model.Errno.ENOSPC => StatusCode.ResourceExhausted,
        Model.Errno.ENOTTY or Model.Errno.ENOSYS or Model.Errno.EOPNOTSUPP or Model.Errno.ENODEV => StatusCode.Unimplemented,
        Model.Errno.EHWPOISON or Model.Errno.EIO => StatusCode.DataLoss,
        Model.Errno.EINTR => StatusCode.Cancelled,
        _ => StatusCode.Unknown,
    };

    /// <summary>The RpcException for a failed model call, with ErrorInfo and the partial result.</summary>
    public static RpcException ToException(Model.Errno errno, IMessage? result, string? what = null)
    {
        var status = new Google.Rpc.Status
        {
            Code = (int)CodeOf(errno),
            Message = what is null ? errno.ToString() : $"{what}: {errno}",
            Details =
            {
                Any.Pack(new ErrorInfo
                {
                    Reason = errno.ToString(),
                    Domain = Domain,
                    Metadata = { ["errno"] = ((int)errno).ToString(CultureInfo.InvariantCulture) },
                }),
            },
        };
        if (result is not null)
            status.Details.Add(Any.Pack(result));
        return status.ToRpcException();
    }

    /// <summary>Throws the mapped status when <paramref name="errno"/> is not OK; else returns <paramref name="result"/>.</summary>
    public static T Check<T>(Model.Errno errno, T result, string? what = null)
        where T : IMessage
    {
        if (errno != Model.Errno.OK)
            throw ToException(errno, result, what);
        return result;
    }
}
