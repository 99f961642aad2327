;; Spins forever without calling the host: must end with limit cpu_time (or a kill).
(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $forever (br $forever))))
