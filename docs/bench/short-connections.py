"""Short TCP connections, as the bench's connection-rate run makes them.

Usage (in a lab): dp lab exec client -- python3 docs/bench/short-connections.py IP PORT SECONDS THREADS
Each connection: connect, read tcpi_total_retrans (a retransmitted SYN
shows there), one request/response, close with RST. Prints the rate, the
connections whose SYN was retransmitted, and errors.
"""
import socket, struct, sys, threading, time
target=(sys.argv[1], int(sys.argv[2])); dur=float(sys.argv[3]); nthreads=int(sys.argv[4])
res=[]
def worker():
    done=retried=errors=0
    end=time.time()+dur
    while time.time()<end:
        s=socket.socket(); s.settimeout(5)
        try:
            s.connect(target)
            ti=s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            if struct.unpack_from("I",ti,100)[0]>0: retried+=1
            s.sendall(b"GET / HTTP/1.0\r\n\r\n"); s.recv(256)
            done+=1
        except Exception as e:
            errors+=1
        finally:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii",1,0)); s.close()
    res.append((done,retried,errors))
ts=[threading.Thread(target=worker) for _ in range(nthreads)]
t0=time.time(); [t.start() for t in ts]; [t.join() for t in ts]
d=sum(r[0] for r in res); r=sum(r[1] for r in res); e=sum(r[2] for r in res)
print(f"{d} connections in {time.time()-t0:.1f}s ({d/(time.time()-t0):.0f}/s), {r} with a retransmitted SYN, {e} errors")
