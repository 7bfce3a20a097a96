import time, unittest, sys
class R(unittest.TextTestResult):
    def startTest(self, t): self._t=time.perf_counter(); super().startTest(t)
    def stopTest(self, t):
        super().stopTest(t); times.append((time.perf_counter()-self._t, str(t)))
times=[]
suite=unittest.defaultTestLoader.loadTestsFromName(sys.argv[1])
unittest.TextTestRunner(resultclass=R, verbosity=0, stream=open('/dev/null','w')).run(suite)
for d,n in sorted(times, reverse=True)[:int(sys.argv[2])]: print(f'{d:6.2f} {n}')
print(sum(d for d,_ in times))
