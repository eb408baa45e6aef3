using System.Globalization;
using Google.Protobuf;
using Google.Rpc;
using Grpc.Core;

namespace UffdGrpc.Client;

/// <summary>Reads the server's error details: the errno of a failed kernel call and its partial result.</summary>
public static class UffdErrors
{
    /// <summary>ErrorInfo.domain of a kernel errno.</summary>
    public const string ErrnoDomain = "uffd.linux";

    /// <summary>ErrorInfo.domain of a request the server rejected before the model saw it.</summary>
    public const string RequestDomain = "uffd.grpc";

    /// <summary>The ErrorInfo of <paramref name="ex"/>, if it carries one.</summary>
    public static ErrorInfo? ErrorInfoOf(RpcException ex) => ex.GetRpcStatus()?.GetDetail<ErrorInfo>();

    /// <summary>True when <paramref name="ex"/> is a kernel errno (not a transport or request error).</summary>
    public static bool TryGetErrno(RpcException ex, out Errno errno)
    {
        errno = Errno.OK;
        var info = ErrorInfoOf(ex);
        if (info is null || info.Domain != ErrnoDomain)
            return false;
        if (info.Metadata.TryGetValue("errno", out var n) && int.TryParse(n, NumberStyles.Integer, CultureInfo.InvariantCulture, out var v))
        {
            errno = (Errno)v;
            return true;
        }
        return Enum.TryParse(info.Reason, out errno);
    }

    /// <summary>The response message with the partial result that a failed call carries, if any.</summary>
    public static T? PartialResult<T>(RpcException ex)
        where T : class, IMessage<T>, new() => ex.GetRpcStatus()?.GetDetail<T>();
}

/// <summary>A kernel errno from a call whose wrapper has no result to return it in.</summary>
public sealed class UffdErrnoException : Exception
{
    public UffdErrnoException()
    {
    }

    public UffdErrnoException(string message)
        : base(message)
    {
    }

    public UffdErrnoException(string message, Exception inner)
        : base(message, inner)
    {
    }

    public UffdErrnoException(Errno errno, RpcException inner)
        : base($"{errno}: {inner.Status.Detail}", inner)
    {
        Errno = errno;
    }

    public Errno Errno { get; }
}
