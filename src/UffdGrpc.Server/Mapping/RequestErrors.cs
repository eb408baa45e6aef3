using System.Globalization;
using Google.Protobuf.WellKnownTypes;
using Google.Rpc;
using Grpc.Core;

namespace UffdGrpc.Server.Mapping;

/// <summary>
/// Statuses for requests the server rejects before the model sees them (nothing changes):
/// malformed or out-of-range fields (INVALID_ARGUMENT + BadRequest), unknown ids
/// (NOT_FOUND), and thread preconditions (FAILED_PRECONDITION). Their ErrorInfo domain is
/// <see cref="Domain"/>, so a client never mistakes them for a kernel errno.
/// </summary>
public static class RequestErrors
{
    public const string Domain = "uffd.grpc";

    public static RpcException Invalid(string field, string description) => new Google.Rpc.Status
    {
        Code = (int)Code.InvalidArgument,
        Message = $"{field}: {description}",
        Details =
        {
            Any.Pack(new ErrorInfo { Reason = "INVALID_REQUEST", Domain = Domain, Metadata = { ["field"] = field } }),
            Any.Pack(new BadRequest { FieldViolations = { new BadRequest.Types.FieldViolation { Field = field, Description = description } } }),
        },
    }.ToRpcException();

    public static RpcException UnknownId(string field, long id, string kind) => new Google.Rpc.Status
    {
        Code = (int)Code.NotFound,
        Message = $"{field}: no {kind} with id {id}",
        Details =
        {
            Any.Pack(new ErrorInfo
            {
                Reason = "UNKNOWN_ID",
                Domain = Domain,
                Metadata = { ["field"] = field, ["id"] = id.ToString(CultureInfo.InvariantCulture) },
            }),
        },
    }.ToRpcException();

    public static RpcException Precondition(string reason, string message) => new Google.Rpc.Status
    {
        Code = (int)Code.FailedPrecondition,
        Message = message,
        Details = { Any.Pack(new ErrorInfo { Reason = reason, Domain = Domain }) },
    }.ToRpcException();

    /// <summary>Rejects a range whose length is zero-or-huge in a way the API (not the kernel) forbids.</summary>
    public static void Require(bool ok, string field, string description)
    {
        if (!ok)
            throw Invalid(field, description);
    }
}
