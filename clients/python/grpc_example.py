"""A Python client of the llorch gRPC services: encode, generate (streaming), decode.

The stubs are generated from the repository's proto/ at run time (grpcio-tools) into a
temporary directory; nothing generated is committed. It also lists each server's services
through reflection (grpcio-reflection, protocol v1alpha) and checks their health.

    LLORCH_TOKENIZER_ADDR=127.0.0.1:50051 LLORCH_ENGINE_ADDR=127.0.0.1:50052 \
        python clients/python/grpc_example.py "Hello."

Exits non-zero when something is wrong, so CI (clients/run.sh) runs it as a test.
"""

import importlib
import os
import pathlib
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc

PROTO_DIR = pathlib.Path(__file__).resolve().parents[2] / "proto"
TOKENIZER = os.environ.get("LLORCH_TOKENIZER_ADDR", "127.0.0.1:50051")
ENGINE = os.environ.get("LLORCH_ENGINE_ADDR", "127.0.0.1:50052")
HEALTH = "grpc.health.v1.Health"


def generate_stubs(out_dir):
    """Compiles proto/**/*.proto into Python modules under out_dir; returns the modules."""
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        sys.exit(f"protoc failed on {protos}")
    sys.path.insert(0, str(out_dir))
    names = ["llorch.tokenizer.v1.tokenizer_pb2", "llorch.tokenizer.v1.tokenizer_pb2_grpc",
             "llorch.engine.v1.engine_pb2", "llorch.engine.v1.engine_pb2_grpc"]
    return [importlib.import_module(n) for n in names]


def reflected_services(channel):
    """The services a server lists through reflection v1alpha."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request])))
    return sorted(s.name for s in reply.list_services_response.service)


def check_server(channel, service):
    """Reflection lists exactly `service` and health; health says SERVING for `service`."""
    listed = reflected_services(channel)
    assert listed == sorted([service, HEALTH]), f"reflection lists {listed}"
    status = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service)).status
    assert status == health_pb2.HealthCheckResponse.SERVING, f"{service} health is {status}"
    print(f"{service}: reflection (v1alpha) lists {listed}; health SERVING")


def main():
    prompt = sys.argv[1] if len(sys.argv) > 1 else "Hello."
    with tempfile.TemporaryDirectory() as out:
        tok_pb, tok_grpc, eng_pb, eng_grpc = generate_stubs(out)
        with grpc.insecure_channel(TOKENIZER) as tch, grpc.insecure_channel(ENGINE) as ech:
            check_server(tch, "llorch.tokenizer.v1.Tokenizer")
            check_server(ech, "llorch.engine.v1.Engine")
            tokenizer = tok_grpc.TokenizerStub(tch)
            engine = eng_grpc.EngineStub(ech)

            ids = list(tokenizer.Encode(tok_pb.EncodeRequest(text=prompt)).ids)
            print(f"Encode({prompt!r}) = {ids}")
            request = eng_pb.GenerateRequest(
                request_id="python-example",
                prompt_ids=ids,
                sampling=eng_pb.SamplingParams(temperature=0.0),
                stopping=eng_pb.StoppingCriteria(max_new_tokens=16),
            )
            generated, finished = [], None
            for reply in engine.Generate(request):
                if reply.WhichOneof("event") == "token":
                    generated.append(reply.token.id)
                else:
                    finished = reply.finished
            assert finished is not None, "the stream ended without Finished"
            reason = eng_pb.FinishReason.Name(finished.reason)
            assert len(generated) == finished.generated_tokens
            print(f"Generate: {generated} ({reason}, {finished.prompt_tokens} prompt tokens)")
            text = tokenizer.Decode(tok_pb.DecodeRequest(ids=generated)).text
            print(f"Decode: {text!r}")
            assert finished.prompt_tokens == len(ids)


if __name__ == "__main__":
    main()
